//! Stale restic locks heal themselves, but only when provably stale: the lock's process is gone from
//! this host, the Pod it names no longer exists, or it was not refreshed for longer than the session
//! may last. A live restic refreshes its lock every 5 minutes, so a live lock is never removed.

use super::executor::{Executor, own_hostname};
use crate::restic::output::Lock;
use crate::restic::{Restic, ResticError};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use std::path::Path;
use std::time::Duration;

/// restic refreshes a held lock this often; an older lock time means no live holder refreshed it.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// restic itself calls a lock stale after this long, and `restic unlock` removes it.
const RESTIC_STALE_AFTER: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, PartialEq, Eq)]
pub enum Staleness {
    Live,
    /// Same host, the process is gone: restic's own rule, so `restic unlock` removes it.
    ProcessGone,
    /// Older than restic's 30 minutes: `restic unlock` removes it too.
    Expired,
    /// The Pod that held it is gone, or it is older than the session may last: only we know.
    Abandoned(String),
}

/// Judges one lock. `pod_exists` answers for lock host names that look like Pod names.
pub fn judge(
    lock: &Lock,
    age: Duration,
    own_host: &str,
    pid_alive: bool,
    pod_gone: bool,
    max_age: Duration,
) -> Staleness {
    if lock.hostname == own_host {
        if !pid_alive {
            return Staleness::ProcessGone;
        }
        return Staleness::Live;
    }
    if age > RESTIC_STALE_AFTER {
        return Staleness::Expired;
    }
    if pod_gone {
        return Staleness::Abandoned(format!("its Pod {} no longer exists", lock.hostname));
    }
    if age > max_age.max(REFRESH_INTERVAL * 2) {
        return Staleness::Abandoned(format!("not refreshed for {}s, longer than a session may last", age.as_secs()));
    }
    Staleness::Live
}

/// Host names of Pods made by a controller end in `-` and five characters of [a-z0-9]; only those
/// are looked up, so a lock held from someone's workstation is never mistaken for a dead Pod's.
fn looks_like_pod(hostname: &str) -> bool {
    hostname.rsplit_once('-').is_some_and(|(head, tail)| {
        !head.is_empty() && tail.len() == 5 && tail.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

fn pid_alive(pid: i64) -> bool {
    pid > 0 && Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes the provably stale locks of the repository before a backup, with an Event on `about`
/// naming each. Returns the ids removed.
pub async fn heal<K: Resource<DynamicType = ()>>(
    executor: &Executor,
    restic: &Restic,
    about: &K,
    max_age: Duration,
) -> Result<Vec<String>, ResticError> {
    let locks = restic.locks().await?;
    if locks.is_empty() {
        return Ok(Vec::new());
    }
    let own_host = own_hostname();
    let pods = executor.api::<Pod>();
    let now = Timestamp::now();
    let mut restic_removes = Vec::new();
    let mut removed = Vec::new();
    for (id, lock) in locks {
        let age: Duration =
            lock.time.parse::<Timestamp>().ok().and_then(|t| now.duration_since(t).try_into().ok()).unwrap_or_default();
        let pod_gone = lock.hostname != own_host
            && looks_like_pod(&lock.hostname)
            && matches!(pods.get_opt(&lock.hostname).await, Ok(None));
        let short = &id[..id.len().min(8)];
        let holder = format!("lock {short} (host {}, pid {}, {}s old)", lock.hostname, lock.pid, age.as_secs());
        match judge(&lock, age, &own_host, pid_alive(lock.pid), pod_gone, max_age) {
            Staleness::Live => {}
            Staleness::ProcessGone => restic_removes.push((id, format!("{holder}: its process is gone"))),
            Staleness::Expired => restic_removes.push((id, format!("{holder}: not refreshed for 30 minutes"))),
            Staleness::Abandoned(why) => {
                if restic.remove_lock(&id).await {
                    executor
                        .event(about, true, "StaleLockRemoved", format!("removed stale restic {holder}: {why}"))
                        .await;
                    removed.push(id);
                } else {
                    let note = format!(
                        "restic {holder} looks stale ({why}) but this backend's locks can only be removed by \
                         restic, after 30 minutes without refresh"
                    );
                    executor.event(about, true, "StaleLockKept", note).await;
                }
            }
        }
    }
    if !restic_removes.is_empty() {
        restic.unlock_stale().await?;
        for (id, note) in restic_removes {
            executor.event(about, true, "StaleLockRemoved", format!("removed stale restic {note}")).await;
            removed.push(id);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(host: &str) -> Lock {
        Lock { time: "2026-11-25T07:00:00Z".into(), exclusive: false, hostname: host.into(), pid: 42 }
    }

    #[test]
    fn only_provably_stale_locks_are_stale() {
        let hour = Duration::from_secs(3600);
        let minute = Duration::from_secs(60);
        assert_eq!(judge(&lock("me"), minute, "me", false, false, hour), Staleness::ProcessGone);
        assert_eq!(judge(&lock("me"), hour * 2, "me", true, false, hour), Staleness::Live);
        assert_eq!(judge(&lock("app-7d9f8-x2k4q"), minute, "me", true, false, hour), Staleness::Live);
        assert!(matches!(judge(&lock("app-7d9f8-x2k4q"), minute, "me", true, true, hour), Staleness::Abandoned(_)));
        assert_eq!(judge(&lock("laptop"), hour, "me", true, false, hour * 2), Staleness::Expired);
        // A short session deadline never undercuts restic's refresh interval.
        assert_eq!(judge(&lock("laptop"), minute * 8, "me", true, false, minute), Staleness::Live);
        assert!(matches!(judge(&lock("laptop"), minute * 11, "me", true, false, minute), Staleness::Abandoned(_)));
    }

    #[test]
    fn pod_names_are_recognised() {
        assert!(looks_like_pod("app-7d9f8c-x2k4q"));
        assert!(looks_like_pod("app-1764043200-0-abcde"));
        assert!(!looks_like_pod("workstation"));
        assert!(!looks_like_pod("db-0"));
    }
}
