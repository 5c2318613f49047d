//! restic's `--json` output: backup progress lines, the final summary, snapshots and locks.

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

/// One line of `restic backup --json`.
#[derive(Debug, Deserialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum BackupMessage {
    Status(BackupProgress),
    Summary(BackupSummary),
    Error(BackupItemError),
    VerboseStatus {},
    #[serde(other)]
    Other,
}

/// A `status` line: where a running backup stands.
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
pub struct BackupProgress {
    #[serde(default)]
    pub percent_done: f64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub total_bytes: u64,
    #[serde(default)]
    pub files_done: u64,
    #[serde(default)]
    pub total_files: u64,
    /// Absent until restic can estimate it.
    #[serde(default)]
    pub seconds_remaining: Option<u64>,
}

/// The numbers restic reports at the end of a backup (fields common to 0.14 and later).
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
pub struct BackupSummary {
    #[serde(default)]
    pub files_new: i64,
    #[serde(default)]
    pub files_changed: i64,
    #[serde(default)]
    pub files_unmodified: i64,
    #[serde(default)]
    pub data_added: u64,
    #[serde(default)]
    pub total_files_processed: i64,
    #[serde(default)]
    pub total_bytes_processed: u64,
    #[serde(default)]
    pub total_duration: f64,
    #[serde(default)]
    pub snapshot_id: String,
}

/// A file restic could not read. 0.14 marshals the error as `{}`; later versions give a message.
#[derive(Debug, Deserialize, Default)]
pub struct BackupItemError {
    #[serde(default)]
    pub error: serde_json::Value,
    #[serde(default)]
    pub during: String,
    #[serde(default)]
    pub item: String,
}

impl BackupItemError {
    pub fn describe(&self) -> String {
        let detail = self.error.get("message").and_then(|m| m.as_str()).unwrap_or("unreadable");
        format!("{} ({}): {detail}", self.item, self.during)
    }
}

/// How many unreadable files a backup names; the rest are counted.
pub(crate) const UNREADABLE_EXAMPLES: usize = 3;

/// What `restic backup --json` reports, read line by line as restic prints it: the summary, and the
/// files it could not read, counted, the first few kept to name them (there may be millions).
#[derive(Debug, Default)]
pub(crate) struct BackupReport<'a> {
    pub(crate) summary: Option<BackupSummary>,
    pub(crate) unreadable: Vec<BackupItemError>,
    pub(crate) unreadable_count: usize,
    /// Where status lines go, when someone watches (the latest one wins).
    pub(crate) progress: Option<&'a tokio::sync::watch::Sender<BackupProgress>>,
}

impl BackupReport<'_> {
    /// Takes one line of restic's stdout; anything that is not JSON is passed over.
    pub(crate) fn line(&mut self, line: &str) {
        if !line.starts_with('{') {
            return;
        }
        match serde_json::from_str::<BackupMessage>(line) {
            Ok(BackupMessage::Status(status)) => {
                if let Some(progress) = self.progress {
                    progress.send_replace(status);
                }
            }
            Ok(BackupMessage::Summary(s)) => self.summary = Some(s),
            Ok(BackupMessage::Error(e)) => {
                self.unreadable_count += 1;
                if self.unreadable.len() < UNREADABLE_EXAMPLES {
                    self.unreadable.push(e);
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
pub struct Snapshot {
    pub id: String,
    #[serde(default)]
    pub short_id: String,
    pub time: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    /// What restic 0.17 and later record of the backup that made the snapshot.
    #[serde(default)]
    pub summary: Option<SnapshotSummary>,
}

/// The part of a snapshot's `summary` that `kubectl stash snapshots` shows.
#[derive(Debug, Deserialize, Clone, PartialEq, Default)]
pub struct SnapshotSummary {
    #[serde(default)]
    pub total_bytes_processed: u64,
}

impl Snapshot {
    /// When the snapshot was taken: restic writes the time in the zone of the restic that took it,
    /// so texts do not compare. None when restic's text does not parse.
    pub fn instant(&self) -> Option<Timestamp> {
        self.time.parse().ok()
    }

    /// Oldest first by instant, then by id (one order on every listing); unparsed times first.
    pub fn chronological(a: &&Snapshot, b: &&Snapshot) -> std::cmp::Ordering {
        (a.instant(), &a.id).cmp(&(b.instant(), &b.id))
    }

    /// The value of a `key=value` tag.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}

/// A lock file as `restic cat lock` prints it.
#[derive(Debug, Deserialize, Clone, PartialEq)]
pub struct Lock {
    pub time: String,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub pid: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_backup_run() {
        let out = r#"{"message_type":"status","percent_done":0.5,"total_files":3,"files_done":1,"total_bytes":10,"bytes_done":5}
{"message_type":"error","error":{"message":"open /data/secret: permission denied"},"during":"archival","item":"/data/secret"}
{"message_type":"error","error":{},"during":"scan","item":"/data/other"}
{"message_type":"summary","files_new":2,"files_changed":1,"files_unmodified":7,"dirs_new":0,"dirs_changed":1,"dirs_unmodified":0,"data_blobs":3,"tree_blobs":2,"data_added":1234,"data_added_packed":999,"total_files_processed":10,"total_bytes_processed":4096,"total_duration":1.25,"backup_start":"2026-11-25T07:00:00Z","snapshot_id":"0123abcd"}"#;
        let mut report = BackupReport::default();
        out.lines().for_each(|line| report.line(line));
        let (summary, errors) = (report.summary.unwrap(), report.unreadable);
        assert_eq!((summary.files_new, summary.files_changed, summary.files_unmodified), (2, 1, 7));
        assert_eq!((summary.data_added, summary.total_bytes_processed), (1234, 4096));
        assert_eq!(summary.snapshot_id, "0123abcd");
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].describe(), "/data/secret (archival): open /data/secret: permission denied");
        assert_eq!(errors[1].describe(), "/data/other (scan): unreadable");
    }

    #[test]
    fn counts_every_unreadable_file_and_keeps_a_few() {
        let mut report = BackupReport::default();
        for i in 0..10 {
            report.line(&format!(r#"{{"message_type":"error","error":{{}},"during":"archival","item":"/data/{i}"}}"#));
        }
        assert_eq!(report.unreadable_count, 10);
        let items: Vec<&str> = report.unreadable.iter().map(|e| e.item.as_str()).collect();
        assert_eq!(items, ["/data/0", "/data/1", "/data/2"]);
    }

    #[test]
    fn reads_tags() {
        let s: Snapshot = serde_json::from_str(
            r#"{"id":"ab","time":"2026-11-25T07:00:00Z","hostname":"db","tags":["session=s-1","batch=app"]}"#,
        )
        .unwrap();
        assert_eq!(s.tag("session"), Some("s-1"));
        assert_eq!(s.tag("sess"), None);
    }
}
