//! The repository Secret as the executors see it: one file per key in a directory (a mounted Secret
//! volume). Values never reach Debug output, logs or error messages.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub const RESTIC_PASSWORD: &str = "RESTIC_PASSWORD";
pub const CA_CERT_DATA: &str = "CA_CERT_DATA";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the secret directory {dir}: {source}")]
    Read { dir: PathBuf, source: std::io::Error },
    #[error("the Secret mounted at {dir} has no {key} key (a Secret missing from the Pod's namespace mounts empty)")]
    Missing { dir: PathBuf, key: &'static str },
}

/// Key → value of a Secret. `Debug` prints the keys only.
#[derive(Clone, Default)]
pub struct SecretValues {
    dir: PathBuf,
    values: BTreeMap<String, String>,
}

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValues").field("dir", &self.dir).field("keys", &self.values.keys()).finish()
    }
}

impl SecretValues {
    /// Reads every regular file of `dir` (a Secret volume: `..data` and other dot entries are the
    /// kubelet's bookkeeping and skipped). Trailing newlines are kept out of the values.
    pub fn read_dir(dir: &Path) -> Result<Self, SecretError> {
        let read_error = |source| SecretError::Read { dir: dir.to_path_buf(), source };
        let mut values = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let value = std::fs::read_to_string(entry.path()).map_err(read_error)?;
            values.insert(name, value.trim_end_matches(['\r', '\n']).to_string());
        }
        Ok(SecretValues { dir: dir.to_path_buf(), values })
    }

    pub fn from_map(dir: impl Into<PathBuf>, values: BTreeMap<String, String>) -> Self {
        SecretValues { dir: dir.into(), values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn require(&self, key: &'static str) -> Result<&str, SecretError> {
        self.get(key).ok_or_else(|| SecretError::Missing { dir: self.dir.clone(), key })
    }

    /// Entries whose key starts with one of `prefixes`.
    pub fn with_prefixes<'a>(&'a self, prefixes: &'a [&str]) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.values
            .iter()
            .filter(move |(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `text` with every secret value (of four characters or more) replaced, as it is and as it
    /// travels percent-encoded in a repository URL: what a tool printed may quote a credential, and it
    /// must not travel on into a status, an Event or a log.
    pub fn redact(&self, text: &str) -> String {
        let mut redacted = text.to_string();
        for value in self.values.values().filter(|v| v.len() >= 4) {
            for form in [value.clone(), super::backend::percent_encode(value)] {
                if redacted.contains(form.as_str()) {
                    redacted = redacted.replace(form.as_str(), "<redacted>");
                }
            }
        }
        redacted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_secret_volume_and_hides_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("RESTIC_PASSWORD"), "s3cr3t-value\n").unwrap();
        std::fs::create_dir(dir.path().join("..2026_11_25")).unwrap();
        std::fs::write(dir.path().join("..data"), "ignored").unwrap();
        let secrets = SecretValues::read_dir(dir.path()).unwrap();
        assert_eq!(secrets.require(RESTIC_PASSWORD).unwrap(), "s3cr3t-value");
        assert!(!format!("{secrets:?}").contains("s3cr3t"));
        assert_eq!(secrets.redact("Fatal: s3cr3t-value rejected"), "Fatal: <redacted> rejected");
        let missing = secrets.require(CA_CERT_DATA).unwrap_err().to_string();
        assert!(missing.contains("CA_CERT_DATA"), "{missing}");
    }

    /// L1: a REST credential travels percent-encoded in the repository URL; an error quoting the URL
    /// must not reveal it either.
    #[test]
    fn percent_encoded_values_are_hidden_too() {
        let map = BTreeMap::from([("REST_SERVER_PASSWORD".to_string(), "p@ss:word/1".to_string())]);
        let secrets = SecretValues::from_map("/etc/stash/repository/secret", map);
        let text = "Fatal: unable to open rest:https://stash:p%40ss%3Aword%2F1@backup.example:8000/repo";
        assert_eq!(
            secrets.redact(text),
            "Fatal: unable to open rest:https://stash:<redacted>@backup.example:8000/repo"
        );
    }
}
