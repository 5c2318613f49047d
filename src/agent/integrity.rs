//! When a finalize runs `restic check`. The check takes the repository's exclusive lock, so every
//! backup of every batch on that repository waits behind it: it runs once per interval (the
//! Repository's `stash.appscode.com/check-interval` annotation, default 24 h), and on every finalize
//! while it has never passed. A pure rule of (now, the Repository) → decision.

use crate::api::repository::Repository;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

pub const CHECK_INTERVAL_ANNOTATION: &str = "stash.appscode.com/check-interval";
const DEFAULT_CHECK_INTERVAL: SignedDuration = SignedDuration::from_hours(24);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Run it; `note` says why when the annotation could not be read (then it runs every time).
    Run { note: Option<String> },
    /// It passed at `passed` and the next is due after `next`.
    Skip { passed: Timestamp, next: Timestamp },
}

pub fn decide(now: Timestamp, repository: &Repository) -> Check {
    let interval = match interval(repository) {
        Ok(interval) => interval,
        Err(note) => return Check::Run { note: Some(note) },
    };
    let status = repository.status.as_ref();
    let passed = status.filter(|s| s.integrity == Some(true)).and_then(|s| s.last_integrity_check_time.as_ref());
    match passed.map(|t| (t.0, t.0.checked_add(interval))) {
        Some((passed, Ok(next))) if now < next => Check::Skip { passed, next },
        _ => Check::Run { note: None },
    }
}

fn interval(repository: &Repository) -> Result<SignedDuration, String> {
    let annotations = repository.metadata.annotations.as_ref();
    let Some(text) = annotations.and_then(|a| a.get(CHECK_INTERVAL_ANNOTATION)) else {
        return Ok(DEFAULT_CHECK_INTERVAL);
    };
    let parsed = crate::api::duration::DurationString::new(text.as_str())
        .parse()
        .map_err(|e| format!("annotation {CHECK_INTERVAL_ANNOTATION}={text:?} is not a duration ({e})"))?;
    SignedDuration::try_from(parsed)
        .map_err(|e| format!("annotation {CHECK_INTERVAL_ANNOTATION}={text:?} is out of range ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::repository::RepositoryStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn repository(annotation: Option<&str>, last: Option<(i64, bool)>) -> Repository {
        let mut repository: Repository = serde_json::from_value(serde_json::json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo"}, "spec": {"backend": {"storageSecretName": "s", "local": {
                "mountPath": "/r", "persistentVolumeClaim": {"claimName": "c"}}}}
        }))
        .expect("a Repository");
        if let Some(value) = annotation {
            repository.metadata.annotations = Some([(CHECK_INTERVAL_ANNOTATION.to_string(), value.to_string())].into());
        }
        repository.status = last.map(|(at, passed)| RepositoryStatus {
            integrity: Some(passed),
            last_integrity_check_time: Some(Time(Timestamp::from_second(at).expect("time"))),
            ..Default::default()
        });
        repository
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    #[test]
    fn a_check_runs_once_per_interval_and_until_one_passes() {
        let day = 86_400;
        assert_eq!(decide(at(day), &repository(None, None)), Check::Run { note: None }, "never checked");
        let passed = repository(None, Some((day, true)));
        assert!(matches!(decide(at(2 * day - 1), &passed), Check::Skip { .. }), "within the day");
        assert_eq!(decide(at(2 * day), &passed), Check::Run { note: None }, "a day later");
        let failed = repository(None, Some((day, false)));
        assert_eq!(decide(at(day + 1), &failed), Check::Run { note: None }, "a failed check is repeated");
        let every = repository(Some("0s"), Some((day, true)));
        assert_eq!(decide(at(day), &every), Check::Run { note: None }, "0s: every finalize");
        let hourly = repository(Some("1h"), Some((day, true)));
        assert!(matches!(decide(at(day + 3599), &hourly), Check::Skip { .. }));
        assert_eq!(decide(at(day + 3600), &hourly), Check::Run { note: None });
    }

    #[test]
    fn an_unreadable_interval_checks_every_time_and_says_why() {
        let Check::Run { note: Some(note) } = decide(at(1), &repository(Some("weekly"), Some((0, true)))) else {
            panic!("an unreadable interval must not skip the check");
        };
        assert!(note.contains(CHECK_INTERVAL_ANNOTATION) && note.contains("weekly"), "{note}");
        // Texts the parser once panicked on, after retention had already forgotten snapshots.
        for odd in ["1h-5m", "99999999999999999999h", "-1h"] {
            let decided = decide(at(1), &repository(Some(odd), Some((0, true))));
            assert!(matches!(decided, Check::Run { note: Some(_) }), "{odd}: {decided:?}");
        }
    }
}
