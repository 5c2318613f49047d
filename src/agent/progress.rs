//! Live progress of one host's backup: restic's status lines, sampled every few seconds, replace the
//! host's entry under its target's `progress` in the session status. An entry is written only when
//! its numbers moved, so `lastChange` tells the operator how long a host has been stuck.

use super::status;
use crate::api::BackupSession;
use crate::api::backup_session::HostProgress;
use crate::restic::output::BackupProgress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// At most one status write per host this often: enough to watch, cheap for the API server.
const PERIOD: Duration = Duration::from_secs(5);

/// The entry to write for `observed` at `now`, or `None` when nothing moved since `written`.
pub(crate) fn next_entry(
    host: &str,
    written: Option<&HostProgress>,
    observed: &BackupProgress,
    now: Timestamp,
) -> Option<HostProgress> {
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let entry = HostProgress {
        hostname: host.to_string(),
        // restic's estimate is a fraction; a float cast saturates, and a bad value reads as 0.
        percent: (observed.percent_done * 100.0).clamp(0.0, 100.0) as i32,
        bytes_done: as_i64(observed.bytes_done),
        total_bytes: as_i64(observed.total_bytes),
        files_done: as_i64(observed.files_done),
        total_files: as_i64(observed.total_files),
        seconds_remaining: observed.seconds_remaining.map(as_i64),
        last_change: Time(now),
    };
    let moved = written.is_none_or(|w| {
        (w.bytes_done, w.total_bytes, w.files_done, w.total_files)
            != (entry.bytes_done, entry.total_bytes, entry.files_done, entry.total_files)
    });
    moved.then_some(entry)
}

/// Samples one host's progress into its session: `start` gives the sender for restic; `stop` it
/// before reporting the host.
pub(crate) struct Reporter {
    task: JoinHandle<()>,
}

impl Reporter {
    pub(crate) fn start(
        sessions: Api<BackupSession>,
        session: String,
        kind: String,
        name: String,
        host: String,
    ) -> (Self, watch::Sender<BackupProgress>) {
        let (sink, mut samples) = watch::channel(BackupProgress::default());
        // Nothing is written before restic sends its first line.
        samples.mark_unchanged();
        let task = tokio::spawn(async move {
            let mut written: Option<HostProgress> = None;
            loop {
                tokio::time::sleep(PERIOD).await;
                match samples.has_changed() {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => return,
                }
                let observed = samples.borrow_and_update().clone();
                let Some(entry) = next_entry(&host, written.as_ref(), &observed, Timestamp::now()) else { continue };
                // Progress is for watching only: a failed write never fails the backup.
                match status::report_progress(&sessions, &session, &kind, &name, &entry).await {
                    Ok(()) => written = Some(entry),
                    Err(err) => tracing::warn!(session, host, error = %err, "could not write backup progress"),
                }
            }
        });
        (Reporter { task }, sink)
    }

    /// Stops sampling. A write in flight may still land; `report_host` removes the entry after it,
    /// and a sample read after the report sees it and writes nothing.
    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(bytes_done: u64, total_bytes: u64, percent_done: f64) -> BackupProgress {
        BackupProgress { percent_done, bytes_done, total_bytes, files_done: 1, total_files: 4, seconds_remaining: None }
    }

    #[test]
    fn the_first_sample_is_written_and_the_same_numbers_are_not_written_again() {
        let t0 = Timestamp::from_second(1_000).expect("time");
        let t1 = Timestamp::from_second(1_005).expect("time");
        let first = next_entry("db", None, &observed(10, 100, 0.1), t0).expect("a first entry");
        assert_eq!((first.percent, first.bytes_done, first.total_bytes, first.last_change.0), (10, 10, 100, t0));
        assert_eq!(next_entry("db", Some(&first), &observed(10, 100, 0.1), t1), None, "nothing moved");
        let moved = next_entry("db", Some(&first), &observed(20, 100, 0.2), t1).expect("moved");
        assert_eq!((moved.bytes_done, moved.last_change.0), (20, t1));
        // A scan that finds more to do is movement too.
        let grew = next_entry("db", Some(&first), &observed(10, 200, 0.05), t1).expect("grew");
        assert_eq!(grew.total_bytes, 200);
    }

    #[test]
    fn odd_estimates_stay_in_range() {
        let t = Timestamp::from_second(0).expect("time");
        for (fraction, percent) in [(f64::NAN, 0), (-1.0, 0), (1.7, 100), (f64::INFINITY, 100), (0.426, 42)] {
            assert_eq!(next_entry("h", None, &observed(1, 2, fraction), t).expect("entry").percent, percent);
        }
    }
}
