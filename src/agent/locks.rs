//! Stale restic locks heal themselves, but only when provably stale by evidence this cluster owns
//! (DESIGN §6b, invariant 3). A lock is removed when
//! (a) it names this very host and its process is gone here, or its pid now belongs to a process
//!     started after the lock was written (the pid was reused); a host name is this host's only
//!     where no other Pod can have it ([`OwnHost`]);
//! (b) its host is a Pod this namespace recorded as a lock holder (name and uid, recorded only for
//!     such host names), and that Pod is gone;
//! (c) it is shared and was not refreshed for restic's 30 minutes, by the repository's own clock;
//! (d) this process has seen the very same lock (its id) for longer than restic's 30 minutes: a live
//!     restic replaces its lock with a new one every 5 minutes and stops when it cannot for 30
//!     ([`exclusively`] waits in rounds to see it).
//! An exclusive lock is removed only by (a), (b) or (d). The time a holder writes into its lock is never
//! compared with our clock: the holder's clock may be skewed. `restic unlock` reads exactly that
//! clock, so it runs only when every lock it would remove is one we proved stale.

use super::executor::{AgentError, Executor, own_hostname};
use crate::restic::output::Lock;
use crate::restic::{Restic, ResticError};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// restic refreshes a held lock every 5 minutes (a new lock file) and calls it stale after this.
const RESTIC_STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// The time `restic unlock` may take, after our last look, to read the locks it removes.
const UNLOCK_MARGIN: Duration = Duration::from_secs(5 * 60);
/// A process start read from /proc (boot time in whole seconds plus clock ticks) may look this
/// much later than the lock its holder wrote right after starting.
const START_SLACK: SignedDuration = SignedDuration::from_secs(2);
/// One Lease per executor host name: the evidence for rule (b). Named after the kernel host name,
/// which is all restic records.
const RECORD_PREFIX: &str = "stash-lock-holder-";
const POD_NAME_ANNOTATION: &str = "stash.appscode.com/pod-name";
const POD_UID_ANNOTATION: &str = "stash.appscode.com/pod-uid";
/// On records whose host name no other Pod can have; records without it (written before it existed,
/// perhaps for a StatefulSet's Pod) prove nothing.
const UNIQUE_HOST_ANNOTATION: &str = "stash.appscode.com/unique-host";
/// The kernel's `USER_HZ`, the unit of /proc/<pid>/stat start times: 100 on every Linux ABI we ship.
const CLOCK_TICKS_PER_SECOND: u64 = 100;

/// The lock's pid on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Process {
    Gone,
    /// Alive, started then (this host's clock, as the holder's lock time is).
    Since(Timestamp),
    /// Alive, start unknown.
    Running,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// The lock names this very host (same kernel host name).
    This(Process),
    /// Another host: `Some(proof)` when it is a Pod this namespace recorded and that Pod is gone.
    Other { pod_gone: Option<String> },
}

/// What the healer observed about one lock, besides its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evidence {
    pub(crate) host: Host,
    /// When the lock file was written, by the repository's clock (local directories only).
    pub(crate) written: Option<Timestamp>,
    /// How long this process has seen this very lock (its id) in the repository, by its own
    /// monotonic clock.
    pub(crate) seen_for: Duration,
}

/// When this process first saw each lock it still sees, by id.
#[derive(Debug, Default)]
pub(crate) struct Sightings(BTreeMap<String, Instant>);

impl Sightings {
    /// Notes the locks seen `now`, forgetting those gone; returns how long each has been seen.
    pub(crate) fn observe<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> BTreeMap<String, Duration> {
        let seen: BTreeMap<String, Instant> =
            ids.into_iter().map(|id| (id.to_string(), self.0.get(id).copied().unwrap_or(now))).collect();
        let since = seen.iter().map(|(id, first)| (id.clone(), now.saturating_duration_since(*first))).collect();
        self.0 = seen;
        since
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Staleness {
    Live,
    ProcessGone,
    PidReused,
    PodGone(String),
    NotRefreshed(Duration),
    /// The same lock, seen by this process for this long.
    SeenUnrefreshed(Duration),
}

impl Staleness {
    /// Why the lock may go, for the Event; None for a live lock.
    fn why(&self) -> Option<String> {
        match self {
            Staleness::Live => None,
            Staleness::ProcessGone => Some("its process is gone".into()),
            Staleness::PidReused => Some("its process is gone (its pid belongs to a newer process)".into()),
            Staleness::PodGone(proof) => Some(proof.clone()),
            Staleness::NotRefreshed(age) => Some(format!(
                "not refreshed for {}s by the repository's clock, longer than restic's 30 minutes",
                age.as_secs()
            )),
            Staleness::SeenUnrefreshed(seen) => Some(format!(
                "the same lock for {}s of this executor's waiting: a live restic replaces its lock every 5 \
                 minutes and gives up after 30 without doing so",
                seen.as_secs()
            )),
        }
    }
}

/// Judges one lock; `now` is the repository's clock, None where the backend does not tell it.
pub(crate) fn judge(now: Option<Timestamp>, lock: &Lock, evidence: &Evidence) -> Staleness {
    match &evidence.host {
        Host::This(Process::Gone) => return Staleness::ProcessGone,
        Host::This(Process::Since(started)) => {
            // restic starts before it writes its lock (both by this host's clock); a process
            // started later holds a reused pid.
            let written = lock.time.parse::<Timestamp>().ok();
            let reused = written.is_some_and(|w| started.duration_since(w) > START_SLACK);
            return if reused { Staleness::PidReused } else { Staleness::Live };
        }
        Host::This(Process::Running) => return Staleness::Live,
        Host::Other { pod_gone: Some(proof) } => return Staleness::PodGone(proof.clone()),
        Host::Other { pod_gone: None } => {}
    }
    if evidence.seen_for > RESTIC_STALE_AFTER {
        return Staleness::SeenUnrefreshed(evidence.seen_for);
    }
    if lock.exclusive {
        return Staleness::Live;
    }
    let age = now.zip(evidence.written).and_then(|(now, written)| Duration::try_from(now.duration_since(written)).ok());
    match age {
        Some(age) if age > RESTIC_STALE_AFTER => Staleness::NotRefreshed(age),
        _ => Staleness::Live,
    }
}

/// What `restic unlock` may remove by its own rule: the holder's time more than 30 minutes behind
/// the clock restic reads when it runs, or our kernel host name with no such process here
/// (`gone_here`), whoever wrote it. That clock has moved on from `local_now` by then, so a lock
/// counts from [`UNLOCK_MARGIN`] before restic's 30 minutes.
fn restic_calls_stale(lock: &Lock, local_now: Timestamp, gone_here: bool) -> bool {
    let old = lock
        .time
        .parse::<Timestamp>()
        .ok()
        .and_then(|t| Duration::try_from(local_now.duration_since(t)).ok())
        .is_some_and(|age| age > RESTIC_STALE_AFTER.saturating_sub(UNLOCK_MARGIN));
    old || gone_here
}

/// Whether `restic unlock` would remove only locks in `proven`, `listed` being the locks (each with
/// whether its holder is this host's and gone here) as listed right before it runs: a lock written
/// after the healer's look is judged too.
fn unlock_removes_only(proven: &BTreeSet<&str>, listed: &[(String, Lock, bool)], local_now: Timestamp) -> bool {
    listed
        .iter()
        .all(|(id, lock, gone_here)| proven.contains(id.as_str()) || !restic_calls_stale(lock, local_now, *gone_here))
}

/// A process's start from its /proc/<pid>/stat line and the boot time (seconds since the epoch).
fn started_at(stat: &str, boot_secs: i64) -> Option<Timestamp> {
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // Field 22 (starttime); `rest` begins with field 3.
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let millis = i64::try_from(ticks.checked_mul(1000)? / CLOCK_TICKS_PER_SECOND).ok()?;
    Timestamp::from_millisecond(boot_secs.checked_mul(1000)?.checked_add(millis)?).ok()
}

fn process(pid: i64) -> Process {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return if pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists() {
            Process::Running
        } else {
            Process::Gone
        };
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|b| b.trim().parse::<i64>().ok()));
    boot.and_then(|b| started_at(&stat, b)).map_or(Process::Running, Process::Since)
}

/// Pod host names are DNS labels; anything else is no Pod and is never looked up.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// This executor's host as restic's locks name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnHost {
    /// The kernel host name.
    name: String,
    /// Whether no other process that may share the repository can have this host name.
    unique: bool,
}

impl OwnHost {
    /// `hostname`, of the Pod `pod` read by its name `pod_name` (None outside a Pod). restic names a
    /// lock's holder by kernel host name only. A Pod's is its name, which only a generated name (a
    /// Job's, ReplicaSet's or DaemonSet's Pod) makes its own: a StatefulSet's `db-0`, a set
    /// `spec.hostname` or hostNetwork's node name is as well another namespace's or cluster's Pod,
    /// writing into the same repository from a process this Pod cannot see. Outside a Pod, the
    /// machine's host name is taken as its own, as restic does.
    pub(crate) fn new(hostname: String, pod_name: Option<&str>, pod: Option<&Pod>) -> Self {
        let unique = match (pod_name, pod) {
            (Some(name), Some(pod)) => {
                pod.metadata.generate_name.is_some()
                    && pod.spec.as_ref().is_none_or(|spec| spec.hostname.is_none())
                    && name == hostname
            }
            _ => true,
        };
        OwnHost { name: hostname, unique }
    }

    /// Whether `lock` was written on this very host, so that its process is seen here.
    pub(crate) fn wrote(&self, lock: &Lock) -> bool {
        self.unique && lock.hostname == self.name
    }
}

/// Records this Pod (name and uid) as a lock holder under its host name, before its restic takes
/// any lock, so that healers of this namespace can prove its locks abandoned once the Pod is gone.
/// Owned by `about` (the session), so records go with the session history. Outside a Pod (no
/// readable Pod object) nothing is recorded and rule (b) never applies to our locks. Returns this
/// host.
pub(crate) async fn record_holder<K: Resource<DynamicType = ()>>(
    executor: &Executor,
    about: &K,
) -> Result<OwnHost, AgentError> {
    let host = own_hostname();
    let Some(pod_name) = executor.settings.pod_name.clone() else { return Ok(OwnHost::new(host, None, None)) };
    let pod = executor.api::<Pod>().get_opt(&pod_name).await?;
    let own = OwnHost::new(host.clone(), Some(&pod_name), pod.as_ref());
    // Only a host name no other Pod can have proves, once its Pod is gone, whose lock it was.
    let Some(pod) = pod.filter(|_| own.unique) else { return Ok(own) };
    let (Some(uid), true) = (pod.uid(), is_dns_label(&host)) else { return Ok(own) };
    let owner = super::plain_owner(about);
    let leases = executor.api::<Lease>();
    let name = format!("{RECORD_PREFIX}{host}");
    let mut record = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(BTreeMap::from([
                (POD_NAME_ANNOTATION.to_string(), pod_name.clone()),
                (POD_UID_ANNOTATION.to_string(), uid),
                (UNIQUE_HOST_ANNOTATION.to_string(), "true".to_string()),
            ])),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec { holder_identity: Some(pod_name), ..LeaseSpec::default() }),
    };
    match leases.get_opt(&name).await? {
        None => leases.create(&PostParams::default(), &record).await.map(drop)?,
        Some(existing) => {
            record.metadata.resource_version = existing.metadata.resource_version;
            leases.replace(&name, &PostParams::default(), &record).await.map(drop)?;
        }
    }
    Ok(own)
}

/// `Some(proof)` when `host` is a Pod this namespace recorded and no Pod of that name and uid exists.
/// Any doubt (no record, an API error) proves nothing.
async fn recorded_pod_gone(executor: &Executor, host: &str) -> Option<String> {
    if !is_dns_label(host) {
        return None;
    }
    let record = executor.api::<Lease>().get_opt(&format!("{RECORD_PREFIX}{host}")).await.ok()??;
    let annotations = record.metadata.annotations?;
    annotations.get(UNIQUE_HOST_ANNOTATION).filter(|unique| *unique == "true")?;
    let (name, uid) = (annotations.get(POD_NAME_ANNOTATION)?, annotations.get(POD_UID_ANNOTATION)?);
    let current = executor.api::<Pod>().get_opt(name).await.ok()?;
    if current.as_ref().and_then(|p| p.uid()).as_ref() == Some(uid) {
        return None;
    }
    Some(format!("its Pod {}/{name} (uid {uid}) no longer exists", executor.namespace()))
}

/// How long one round of waiting for other processes' locks lasts in [`exclusively`]: between rounds
/// the locks are looked at again, so that one left by a dead process is seen unchanged.
const LOCK_ROUND: Duration = Duration::from_secs(5 * 60);

/// Runs `step` (restic commands that may run again after a lock stopped them, as a lock stops restic
/// before it changes anything) waiting for other processes' locks until `deadline`. It waits in
/// rounds, healing between them, so that a lock whose holder died where no evidence of ours reaches
/// (another namespace's or cluster's Pod, a StatefulSet's host name) goes by rule (d) instead of
/// holding the repository until the deadline.
pub(crate) async fn exclusively<K: Resource<DynamicType = ()>, T>(
    executor: &Executor,
    restic: &mut Restic,
    about: &K,
    deadline: Instant,
    mut step: impl AsyncFnMut(&Restic) -> Result<T, AgentError>,
) -> Result<T, AgentError> {
    let mut sightings = Sightings::default();
    loop {
        heal_seen(executor, restic, about, &mut sightings).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let round = left.min(LOCK_ROUND);
        match restic.waiting_at_most(round, async |restic| step(restic).await).await {
            Err(AgentError::Restic(ResticError::Locked(_))) if round < left => {}
            done => return done,
        }
    }
}

/// What the healer decided about one lock (`kubectl stash unlock` reports every one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockVerdict {
    pub id: String,
    /// `exclusive lock 1a2b3c4d (host h, pid 7)`.
    pub holder: String,
    pub removed: bool,
    /// Why it went, or why it stays.
    pub why: String,
}

/// Removes the provably stale locks of the repository before a backup or finalize (or when a user
/// asks, `kubectl stash unlock`), with an Event on `about` naming each. Returns a verdict per lock.
pub(crate) async fn heal<K: Resource<DynamicType = ()>>(
    executor: &Executor,
    restic: &Restic,
    about: &K,
) -> Result<Vec<LockVerdict>, AgentError> {
    heal_seen(executor, restic, about, &mut Sightings::default()).await
}

/// [`heal`], with what this process saw of the locks before.
async fn heal_seen<K: Resource<DynamicType = ()>>(
    executor: &Executor,
    restic: &Restic,
    about: &K,
    sightings: &mut Sightings,
) -> Result<Vec<LockVerdict>, AgentError> {
    let own = record_holder(executor, about).await?;
    let locks = restic.locks().await?;
    let mut seen_for = sightings.observe(locks.iter().map(|(id, _)| id.as_str()), Instant::now());
    if locks.is_empty() {
        return Ok(Vec::new());
    }
    let now = restic.clock().and_then(|t| Timestamp::try_from(t).ok());
    let local_now = Timestamp::now();
    let mut verdicts = Vec::new();
    let mut for_restic = Vec::new();
    // The process a lock names when its host is this kernel's: restic's rule and ours both read it.
    let named_here = |lock: &Lock| (lock.hostname == own.name).then(|| process(lock.pid));
    for (id, lock) in locks {
        let named_here = named_here(&lock);
        let host = if let Some(process) = named_here.filter(|_| own.wrote(&lock)) {
            Host::This(process)
        } else {
            Host::Other { pod_gone: recorded_pod_gone(executor, &lock.hostname).await }
        };
        let written = restic.lock_written(&id).and_then(|t| Timestamp::try_from(t).ok());
        let evidence = Evidence { host, written, seen_for: seen_for.remove(&id).unwrap_or_default() };
        let restic_would = restic_calls_stale(&lock, local_now, named_here == Some(Process::Gone));
        let short = &id[..id.len().min(8)];
        let kind = if lock.exclusive { "exclusive" } else { "shared" };
        let holder = format!("{kind} lock {short} (host {}, pid {})", lock.hostname, lock.pid);
        let verdict = |removed: bool, why: String| LockVerdict { id: id.clone(), holder: holder.clone(), removed, why };
        match judge(now, &lock, &evidence).why() {
            None => verdicts.push(verdict(false, "not provably stale".into())),
            Some(why) if restic.remove_lock(&id).await => {
                let note = format!("removed stale restic {holder}: {why}");
                executor.event(about, true, "StaleLockRemoved", note).await;
                verdicts.push(verdict(true, why));
            }
            Some(why) if restic_would => for_restic.push(verdict(false, why)),
            Some(why) => {
                let note = format!(
                    "restic {holder} is stale ({why}) but this backend's locks can only be removed by \
                     `restic unlock`, which does not consider it stale yet"
                );
                executor.event(about, true, "StaleLockKept", note.clone()).await;
                verdicts.push(verdict(false, note));
            }
        }
    }
    if for_restic.is_empty() {
        return Ok(verdicts);
    }
    // Listed again: a lock written since the look above is one restic would read too.
    let proven: BTreeSet<&str> = for_restic.iter().map(|v: &LockVerdict| v.id.as_str()).collect();
    let listed: Vec<(String, Lock, bool)> = restic
        .locks()
        .await?
        .into_iter()
        .map(|(id, lock)| {
            let gone_here = named_here(&lock) == Some(Process::Gone);
            (id, lock, gone_here)
        })
        .collect();
    let unlock_safe = unlock_removes_only(&proven, &listed, Timestamp::now());
    if unlock_safe {
        restic.unlock_stale().await?;
    }
    for mut pending in for_restic {
        let holder = &pending.holder;
        if unlock_safe {
            let note = format!("removed stale restic {holder}: {}", pending.why);
            executor.event(about, true, "StaleLockRemoved", note).await;
            pending.removed = true;
        } else {
            let note = format!(
                "restic {holder} is stale ({}) but kept: `restic unlock` would also remove a lock \
                 not proven stale, and this backend's locks can only be removed by restic",
                pending.why
            );
            executor.event(about, true, "StaleLockKept", note.clone()).await;
            pending.why = note;
        }
        verdicts.push(pending);
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-11-25T07:00:00Z";

    fn at(offset_secs: i64) -> Timestamp {
        T.parse::<Timestamp>().expect("time") + SignedDuration::from_secs(offset_secs)
    }

    fn lock(host: &str, exclusive: bool) -> Lock {
        Lock { time: T.into(), exclusive, hostname: host.into(), pid: 42 }
    }

    fn here(process: Process) -> Evidence {
        Evidence { host: Host::This(process), written: Some(at(0)), seen_for: Duration::ZERO }
    }

    /// Another host, its lock file written `written` seconds after T by the repository's clock.
    fn elsewhere(pod_gone: bool, written: Option<i64>) -> Evidence {
        let pod_gone = pod_gone.then(|| "its Pod ns/app-7d9f8c-x2k4q (uid u) no longer exists".to_string());
        Evidence { host: Host::Other { pod_gone }, written: written.map(at), seen_for: Duration::ZERO }
    }

    #[test]
    fn only_provably_stale_locks_are_stale() {
        let (hour, day) = (3600, 86_400);
        let pod = "app-7d9f8c-x2k4q";
        // (a) this host: the process is gone, or its pid now belongs to a process started later.
        assert_eq!(judge(None, &lock("me", true), &here(Process::Gone)), Staleness::ProcessGone);
        assert_eq!(judge(None, &lock("me", false), &here(Process::Since(at(600)))), Staleness::PidReused);
        assert_eq!(judge(None, &lock("me", true), &here(Process::Since(at(-60)))), Staleness::Live);
        assert_eq!(judge(None, &lock("me", true), &here(Process::Since(at(1)))), Staleness::Live);
        assert_eq!(judge(None, &lock("me", true), &here(Process::Running)), Staleness::Live);
        assert_eq!(judge(Some(at(day)), &lock("me", false), &here(Process::Since(at(-60)))), Staleness::Live);
        // (b) a Pod this namespace recorded is gone: exclusive locks too.
        assert!(matches!(judge(None, &lock(pod, true), &elsewhere(true, None)), Staleness::PodGone(_)));
        // A Pod-named host this namespace never recorded (another namespace, cluster): kept at any age.
        assert_eq!(judge(Some(at(day)), &lock(pod, false), &elsewhere(false, Some(day - 60))), Staleness::Live);
        assert_eq!(judge(None, &lock(pod, true), &elsewhere(false, None)), Staleness::Live);
        // (c) shared and not refreshed for 30 minutes by the repository's clock.
        assert_eq!(
            judge(Some(at(hour)), &lock(pod, false), &elsewhere(false, Some(0))),
            Staleness::NotRefreshed(Duration::from_secs(3600))
        );
        assert_eq!(judge(Some(at(20 * 60)), &lock(pod, false), &elsewhere(false, Some(0))), Staleness::Live);
        // An exclusive lock is never removed by age.
        assert_eq!(judge(Some(at(day)), &lock(pod, true), &elsewhere(false, Some(0))), Staleness::Live);
        // No repository clock (REST, S3): age proves nothing.
        assert_eq!(judge(None, &lock(pod, false), &elsewhere(false, Some(0))), Staleness::Live);
    }

    #[test]
    fn the_holders_clock_does_not_decide() {
        let pod = "app-7d9f8c-x2k4q";
        let mut past = lock(pod, false);
        past.time = "2016-01-01T00:00:00Z".into();
        let mut future = lock(pod, false);
        future.time = "2036-01-01T00:00:00Z".into();
        // Written a minute ago by the repository's clock: live, whatever time the holder wrote.
        assert_eq!(judge(Some(at(60)), &past, &elsewhere(false, Some(0))), Staleness::Live);
        // Written two hours ago: not refreshed, though the holder's time says the future.
        assert!(matches!(judge(Some(at(7200)), &future, &elsewhere(false, Some(0))), Staleness::NotRefreshed(_)));
        // restic's own rule reads the holder's time, so `restic unlock` would remove `past`.
        assert!(restic_calls_stale(&past, at(60), false));
        assert!(!restic_calls_stale(&future, at(60), false));
        assert!(restic_calls_stale(&lock("me", false), at(60), true));
    }

    /// `restic unlock` reads the locks and its clock after our look: a live lock whose holder's
    /// clock runs 27 minutes behind, refreshed 2 minutes ago, is 29 minutes old by ours now and
    /// 30 by the time restic reads it; and a lock written after our look is in restic's listing.
    #[test]
    fn restic_unlock_runs_only_when_a_fresh_listing_holds_nothing_it_may_remove_unproven() {
        let mut behind = lock("db-0", true);
        behind.time = at(0).to_string();
        assert!(restic_calls_stale(&behind, at(29 * 60), false), "near restic's 30 minutes is near enough");
        assert!(!restic_calls_stale(&behind, at(20 * 60), false));
        let proven = BTreeSet::from(["dead"]);
        let (dead, live) = ("dead".to_string(), "live".to_string());
        let mut old = lock("db-0", false);
        old.time = at(-3600).to_string();
        assert!(unlock_removes_only(&proven, &[(dead.clone(), old.clone(), false)], at(0)));
        assert!(unlock_removes_only(
            &proven,
            &[(dead.clone(), old.clone(), false), (live.clone(), lock("db-1", true), false)],
            at(0)
        ));
        assert!(!unlock_removes_only(
            &proven,
            &[(dead.clone(), old.clone(), false), (live.clone(), old, false)],
            at(0)
        ));
        assert!(!unlock_removes_only(
            &proven,
            &[(dead, lock("me", true), false), (live, lock("me", true), true)],
            at(0)
        ));
    }

    /// restic replaces a held lock every 5 minutes (a new id) and stops after 30 without: a lock this
    /// process saw unchanged for longer is stale, shared or exclusive, whoever holds it and whatever
    /// any clock but ours says.
    #[test]
    fn a_lock_seen_unchanged_longer_than_restic_allows_is_stale() {
        let (minute, db) = (Duration::from_secs(60), "db-0");
        let seen =
            |minutes: u32| Evidence { host: Host::Other { pod_gone: None }, written: None, seen_for: minute * minutes };
        assert_eq!(judge(None, &lock(db, true), &seen(31)), Staleness::SeenUnrefreshed(minute * 31));
        assert_eq!(judge(None, &lock(db, false), &seen(31)), Staleness::SeenUnrefreshed(minute * 31));
        assert_eq!(judge(None, &lock(db, true), &seen(29)), Staleness::Live);
        let mut here = here(Process::Running);
        here.seen_for = minute * 31;
        assert_eq!(judge(None, &lock(db, true), &here), Staleness::Live, "its process runs here");
    }

    /// A restic of the model: it locks at `start` (minutes), replaces its lock every `refresh` minutes
    /// (5, or later on a slow backend) and dies at `death`, leaving its last lock behind.
    #[derive(Debug, Clone)]
    struct ModelHolder {
        start: u32,
        refresh: u32,
        death: Option<u32>,
        exclusive: bool,
    }

    impl ModelHolder {
        /// The id of its lock at minute `t`, if it had locked by then.
        fn lock_at(&self, index: usize, t: u32) -> Option<String> {
            let until = self.death.map_or(t, |death| t.min(death));
            (t >= self.start).then(|| format!("{index}-{}", (until - self.start) / self.refresh))
        }

        fn alive_at(&self, t: u32) -> bool {
            self.death.is_none_or(|death| t < death)
        }
    }

    fn holder() -> impl Strategy<Value = ModelHolder> {
        (0u32..120, 5u32..10, proptest::option::of(0u32..180), any::<bool>()).prop_map(
            |(start, refresh, death, exclusive)| ModelHolder {
                start,
                refresh,
                death: death.map(|d| start + d),
                exclusive,
            },
        )
    }

    proptest! {
        /// Holders of other namespaces or clusters (no evidence of ours reaches them) lock, refresh
        /// and die; an executor looks at the locks at random minutes. A lock it calls stale is never
        /// a live holder's, and a dead holder's lock seen for more than 30 minutes is stale.
        #[test]
        fn only_a_dead_holders_lock_is_ever_seen_unrefreshed(
            holders in proptest::collection::vec(holder(), 1..4),
            mut looks in proptest::collection::vec(0u32..300, 1..40),
        ) {
            looks.sort_unstable();
            let origin = Instant::now();
            let mut sightings = Sightings::default();
            let mut first_seen: BTreeMap<String, u32> = BTreeMap::new();
            for t in looks {
                let present: Vec<(usize, String)> =
                    holders.iter().enumerate().filter_map(|(i, h)| h.lock_at(i, t).map(|id| (i, id))).collect();
                let seen = sightings.observe(present.iter().map(|(_, id)| id.as_str()), origin + Duration::from_secs(u64::from(t) * 60));
                for (i, id) in &present {
                    let first = *first_seen.entry(id.clone()).or_insert(t);
                    let evidence = Evidence { host: Host::Other { pod_gone: None }, written: None, seen_for: seen[id] };
                    let verdict = judge(None, &lock("db-0", holders[*i].exclusive), &evidence);
                    if verdict != Staleness::Live {
                        prop_assert!(!holders[*i].alive_at(t), "{id} of a live holder called stale at minute {t}");
                    }
                    if t - first > 30 {
                        prop_assert_eq!(verdict, Staleness::SeenUnrefreshed(Duration::from_secs(u64::from(t - first) * 60)));
                    }
                }
                first_seen.retain(|id, _| present.iter().any(|(_, p)| p == id));
            }
        }
    }

    #[test]
    fn sightings_keep_the_first_time_of_each_lock_still_there() {
        let t0 = Instant::now();
        let mut sightings = Sightings::default();
        assert_eq!(sightings.observe(["a", "b"], t0)["a"], Duration::ZERO);
        let later = sightings.observe(["a", "c"], t0 + Duration::from_secs(300));
        assert_eq!((later["a"], later["c"]), (Duration::from_secs(300), Duration::ZERO));
        // A lock gone and back (an id is never reused; here, a test) starts over.
        let again = sightings.observe(["b"], t0 + Duration::from_secs(600));
        assert_eq!(again["b"], Duration::ZERO);
    }

    /// A Pod of `name`; `generated` when a controller named it (Job, ReplicaSet, DaemonSet).
    fn pod(name: &str, generated: bool, hostname: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.generate_name = generated.then(|| format!("{}-", name.rsplit_once('-').map_or(name, |(p, _)| p)));
        pod.spec =
            Some(k8s_openapi::api::core::v1::PodSpec { hostname: hostname.map(Into::into), ..Default::default() });
        pod
    }

    /// restic says who holds a lock by kernel host name only. A StatefulSet's `db-0` of another
    /// namespace (or cluster) backing up into the same repository has ours, and its process is not in
    /// our Pod: its live lock must not read as ours with its process gone.
    #[test]
    fn a_lock_is_this_hosts_only_where_no_other_pod_can_have_its_host_name() {
        let generated = "app-7d9f8c-x2k4q";
        let stateful = OwnHost::new("db-0".into(), Some("db-0"), Some(&pod("db-0", false, None)));
        assert!(!stateful.wrote(&lock("db-0", false)), "another namespace's db-0 has the same host name");
        let own = OwnHost::new(generated.into(), Some(generated), Some(&pod(generated, true, None)));
        assert!(own.wrote(&lock(generated, true)), "a generated Pod name is this Pod's alone");
        assert!(!own.wrote(&lock("db-0", true)));
        // A set spec.hostname, or hostNetwork (the node's host name, shared by its Pods): not ours alone.
        let named = OwnHost::new("db".into(), Some(generated), Some(&pod(generated, true, Some("db"))));
        assert!(!named.wrote(&lock("db", false)));
        let host_network = OwnHost::new("node-1".into(), Some(generated), Some(&pod(generated, true, None)));
        assert!(!host_network.wrote(&lock("node-1", false)));
        // Outside a Pod (no POD_NAME, or no such Pod): the machine's host name, as restic assumes.
        assert!(OwnHost::new("build-1".into(), None, None).wrote(&lock("build-1", false)));
        assert!(OwnHost::new("build-1".into(), Some("x"), None).wrote(&lock("build-1", false)));
    }

    /// A Pod of the model cluster: how it was named and where it runs.
    #[derive(Debug, Clone)]
    struct ModelPod {
        /// 0: a StatefulSet's `db-0`; 1: a set `spec.hostname`; 2: hostNetwork; 3: a generated name.
        naming: u8,
        node: u8,
    }

    impl ModelPod {
        /// The Pod object, its kernel host name; `index` makes a generated name its own.
        fn observed(&self, index: usize) -> (Pod, String) {
            let generated = format!("app-7d9f8c-{index:05}");
            let node = format!("node-{}", self.node);
            match self.naming {
                0 => (pod("db-0", false, None), "db-0".into()),
                1 => (pod(&generated, true, Some("db")), "db".into()),
                2 => (pod(&generated, true, None), node),
                _ => (pod(&generated, true, None), generated),
            }
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Pods of several namespaces and nodes back up into one repository: no Pod ever takes a
        /// lock written by another Pod for its own (whose process it could then call gone).
        #[test]
        fn no_pod_takes_another_pods_lock_for_its_own(
            pods in proptest::collection::vec((0u8..4, 0u8..2).prop_map(|(naming, node)| ModelPod { naming, node }), 2..8),
        ) {
            let observed: Vec<_> = pods.iter().enumerate().map(|(i, p)| p.observed(i)).collect();
            for (i, (pod, hostname)) in observed.iter().enumerate() {
                let own = OwnHost::new(hostname.clone(), pod.metadata.name.as_deref(), Some(pod));
                for (j, (_, writer)) in observed.iter().enumerate() {
                    if i != j {
                        prop_assert!(!own.wrote(&lock(writer, true)), "{hostname} took {writer}'s lock for its own");
                    }
                }
                prop_assert_eq!(own.wrote(&lock(hostname, true)), pods[i].naming == 3);
            }
        }
    }

    #[test]
    fn process_start_is_read_from_proc() {
        let stat = "1234 (re stic) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 8 0 250 0 0";
        assert_eq!(
            started_at(stat, 1_700_000_000),
            Some(Timestamp::from_second(1_700_000_002).expect("t") + SignedDuration::from_millis(500))
        );
        assert_eq!(started_at("garbage", 0), None);
        assert!(matches!(process(i64::from(std::process::id())), Process::Since(_)));
        assert_eq!(process(0), Process::Gone);
    }

    #[test]
    fn only_dns_labels_are_looked_up() {
        assert!(is_dns_label("app-7d9f8c-x2k4q"));
        assert!(is_dns_label("db-0"));
        assert!(!is_dns_label("Workstation.local"));
        assert!(!is_dns_label(""));
    }
}
