//! When a finished session's finalize Job is made (again). A session that is not finalized has no
//! manifest, so it is no restorable set, and retention keeps its data forever: a Job that failed
//! (a backend down for longer than the Job's own retry, a lock held) is replaced after a backoff
//! for as long as the session exists, instead of leaving it unsettled for good.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// The Job's attempt number, counted from 1; the next attempt's Job carries the next number.
pub const ATTEMPT_ANNOTATION: &str = "stash.appscode.com/finalize-attempt";
/// The wait after the first failure; it doubles with every attempt, as a Job's own Pod backoff does.
const FIRST_DELAY: SignedDuration = SignedDuration::from_secs(10);
/// The longest wait: an hour-long outage costs at most an hour more before its session is finalized.
const LONGEST_DELAY: SignedDuration = SignedDuration::from_secs(3600);

/// What the controller sees of a finalize Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub attempt: u32,
    /// When the Job was marked Failed, if it was.
    pub failed_at: Option<Timestamp>,
    /// The Job is being deleted: its replacement waits for it to go.
    pub deleting: bool,
}

impl Observed {
    pub fn of(job: &Job) -> Self {
        let annotations = job.metadata.annotations.as_ref();
        let attempt = annotations.and_then(|a| a.get(ATTEMPT_ANNOTATION)).and_then(|a| a.parse().ok()).unwrap_or(1);
        let failed = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Failed" && c.status == "True"));
        // A Failed condition without a time counts from the Job's creation: a retry is never
        // held back by a field the Job controller always sets.
        let failed_at = failed.map(|c| {
            c.last_transition_time
                .as_ref()
                .or(job.metadata.creation_timestamp.as_ref())
                .map_or(Timestamp::UNIX_EPOCH, |t| t.0)
        });
        Self { attempt, failed_at, deleting: job.metadata.deletion_timestamp.is_some() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now: the session is finalized, or its Job runs (its changes wake the session).
    Wait,
    /// Make the Job with this attempt number (none exists).
    Make { attempt: u32 },
    /// The Job failed and its backoff is over: delete it and make this attempt.
    Replace { attempt: u32 },
    /// The Job failed; look again at this time.
    RetryAt(Timestamp),
}

/// The step for a finished session's finalize Job, `job` as observed, at `now`.
pub fn step(finalized: bool, job: Option<Observed>, now: Timestamp) -> Step {
    if finalized {
        return Step::Wait;
    }
    let Some(job) = job else { return Step::Make { attempt: 1 } };
    let Some(failed_at) = job.failed_at.filter(|_| !job.deleting) else { return Step::Wait };
    let due = failed_at.checked_add(delay(job.attempt)).unwrap_or(Timestamp::MAX);
    if now >= due { Step::Replace { attempt: job.attempt.saturating_add(1) } } else { Step::RetryAt(due) }
}

/// The wait after attempt `attempt` failed: 10 s, 20 s, 40 s… up to an hour.
fn delay(attempt: u32) -> SignedDuration {
    let doublings = attempt.saturating_sub(1).min(16);
    FIRST_DELAY.checked_mul(1 << doublings).map_or(LONGEST_DELAY, |d| d.min(LONGEST_DELAY))
}

/// Marks `job` as attempt `attempt`.
pub fn mark(job: &mut Job, attempt: u32) {
    job.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ATTEMPT_ANNOTATION.into(), attempt.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("time")
    }

    fn failed(attempt: u32, seconds: i64) -> Option<Observed> {
        Some(Observed { attempt, failed_at: Some(at(seconds)), deleting: false })
    }

    #[test]
    fn a_missing_job_is_made_and_a_running_one_left_alone() {
        assert_eq!(step(false, None, at(0)), Step::Make { attempt: 1 });
        let running = Some(Observed { attempt: 3, failed_at: None, deleting: false });
        assert_eq!(step(false, running, at(0)), Step::Wait);
    }

    #[test]
    fn a_failed_job_is_replaced_after_a_doubling_backoff() {
        assert_eq!(step(false, failed(1, 100), at(105)), Step::RetryAt(at(110)));
        assert_eq!(step(false, failed(1, 100), at(110)), Step::Replace { attempt: 2 });
        assert_eq!(step(false, failed(2, 100), at(110)), Step::RetryAt(at(120)));
        assert_eq!(step(false, failed(4, 100), at(180)), Step::Replace { attempt: 5 });
    }

    #[test]
    fn the_backoff_stops_growing_at_an_hour() {
        assert_eq!(delay(9), SignedDuration::from_secs(2560));
        assert_eq!(delay(10), LONGEST_DELAY);
        assert_eq!(delay(u32::MAX), LONGEST_DELAY);
        assert_eq!(step(false, failed(u32::MAX, 0), at(3600)), Step::Replace { attempt: u32::MAX });
    }

    #[test]
    fn a_finalized_session_or_a_job_being_deleted_waits() {
        assert_eq!(step(true, None, at(0)), Step::Wait);
        assert_eq!(step(true, failed(1, 0), at(1000)), Step::Wait);
        let deleting = Some(Observed { attempt: 1, failed_at: Some(at(0)), deleting: true });
        assert_eq!(step(false, deleting, at(1000)), Step::Wait);
    }

    #[test]
    fn the_attempt_and_failure_time_are_read_from_the_job() {
        let mut job = Job::default();
        assert_eq!(Observed::of(&job), Observed { attempt: 1, failed_at: None, deleting: false });
        mark(&mut job, 4);
        job.status = serde_json::from_value(serde_json::json!({"conditions": [
            {"type": "Failed", "status": "True", "lastTransitionTime": "2026-11-28T10:00:00Z"}]}))
        .expect("status");
        let observed = Observed::of(&job);
        assert_eq!((observed.attempt, observed.failed_at), (4, Some("2026-11-28T10:00:00Z".parse().expect("time"))));
        job.metadata.annotations = Some([(ATTEMPT_ANNOTATION.to_string(), "x".to_string())].into());
        assert_eq!(Observed::of(&job).attempt, 1, "an odd annotation counts as the first attempt");
    }
}
