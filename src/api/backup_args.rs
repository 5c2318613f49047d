//! Which restic flags a BackupBatch member may pass in `target.args`.
//!
//! restic's global flags choose the repository, its password and whom to trust (`--repo`,
//! `--password-command`, `-o`, `--cacert`, …), and some backup flags decide what a snapshot is
//! (`--tag`, `--host`, `--parent`); the author of a batch could otherwise make the executor run a
//! command of their choosing, write into another repository or forge another session's snapshot.
//! So only flags that leave files out, decide how changes are detected, or tune how data is read
//! and stored pass. Refused on purpose, among others: `--tag`, `--host`, `--time` (a snapshot's
//! identity is its session's), `--parent` and `--group-by` (another host's or namespace's snapshot
//! as parent would let restic take its content as unchanged files), `--dry-run` and
//! `--skip-if-unchanged` (no snapshot, so no complete session), `--stdin*`, `--files-from*`,
//! `--exclude-file` and `--iexclude-file` (they read files the executor sees; patterns belong in
//! `target.exclude`), output flags (the executor reads restic's JSON), and arguments that are not
//! flags (restic would back them up as extra paths: those belong in `target.paths`).
//!
//! Both of pflag's spellings are understood, `--flag=value` and `--flag value`; a separate value
//! may not start with `-`, so that every entry starting with `-` is a flag to check, which is all
//! the admission policy (deploy/base/admission-policy.yaml, the same list) can see. Short flags are
//! refused: pflag folds them together (`-xe PATTERN`).

/// The flags a member may pass, and whether each takes a value.
pub(crate) const ALLOWED: &[(&str, bool)] = &[
    // What is read: each can only leave files out.
    ("--exclude", true),
    ("--iexclude", true),
    ("--exclude-caches", false),
    ("--exclude-if-present", true),
    ("--exclude-larger-than", true),
    ("--one-file-system", false),
    // How changes are detected: a file is read again or not, never another one.
    ("--force", false),
    ("--ignore-ctime", false),
    ("--ignore-inode", false),
    ("--no-scan", false),
    ("--with-atime", false),
    // How data is read, packed and sent, within the executor's own resources.
    ("--read-concurrency", true),
    ("--compression", true),
    ("--pack-size", true),
    ("--limit-upload", true),
    ("--limit-download", true),
];

/// Why `args[index]` may not reach restic. Only a flag's name is ever quoted, never a value, which
/// may hold a secret (`--password-command=…`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusedArg {
    #[error("args[{index}]: {flag} is not a restic flag a member may pass (allowed: {})", allowed_names())]
    NotAllowed { index: usize, flag: String },
    #[error(
        "args[{index}]: {flag} needs a value: {flag}=VALUE, or VALUE as the next entry when it does not start with '-'"
    )]
    MissingValue { index: usize, flag: String },
    #[error("args[{index}] is not a flag: restic would back it up as a path (paths belong in target.paths)")]
    NotAFlag { index: usize },
}

fn allowed_names() -> String {
    ALLOWED.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// The first entry of `args` that may not reach `restic backup`, if any.
pub(crate) fn check_backup_args(args: &[String]) -> Result<(), RefusedArg> {
    let mut entries = args.iter().enumerate();
    while let Some((index, arg)) = entries.next() {
        if !arg.starts_with('-') {
            return Err(RefusedArg::NotAFlag { index });
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, _)) => (name, true),
            None => (arg.as_str(), false),
        };
        // `-rREPO` glues a short flag to its value: only the flag is quoted.
        let flag = if name.starts_with("--") { name } else { name.get(..2).unwrap_or(name) };
        let Some(&(_, takes_value)) = ALLOWED.iter().find(|(allowed, _)| *allowed == name) else {
            return Err(RefusedArg::NotAllowed { index, flag: flag.to_string() });
        };
        if takes_value && !inline_value && entries.next().is_none_or(|(_, value)| value.starts_with('-')) {
            return Err(RefusedArg::MissingValue { index, flag: flag.to_string() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> Result<(), RefusedArg> {
        check_backup_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    fn not_allowed(index: usize, flag: &str) -> Result<(), RefusedArg> {
        Err(RefusedArg::NotAllowed { index, flag: flag.into() })
    }

    #[test]
    fn allowed_flags_pass_in_both_spellings() {
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(check(&["--exclude", "*.tmp", "--exclude=*.log", "--one-file-system"]), Ok(()));
        assert_eq!(check(&["--exclude-larger-than", "1G", "--compression=max", "--read-concurrency", "4"]), Ok(()));
        assert_eq!(check(&["--exclude-caches=true", "--exclude=", "--exclude", "a=b"]), Ok(()), "values may hold '='");
    }

    #[test]
    fn flags_that_reach_the_repository_password_or_trust_are_refused_by_name_only() {
        assert_eq!(check(&["--password-command=sh -c 'curl evil'"]), not_allowed(0, "--password-command"));
        assert_eq!(check(&["--exclude", "x", "--repo", "/elsewhere"]), not_allowed(2, "--repo"));
        assert_eq!(check(&["--option", "s3.bucket-lookup=dns"]), not_allowed(0, "--option"));
        assert_eq!(check(&["--cacert=/tmp/ca.pem"]), not_allowed(0, "--cacert"));
        assert_eq!(check(&["-o", "sftp.command=ssh evil"]), not_allowed(0, "-o"));
        assert_eq!(check(&["-rrest:http://x/"]), not_allowed(0, "-r"), "a short flag's glued value is not quoted");
        let message = check(&["--password-command=echo hunter2"]).unwrap_err().to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("--exclude-larger-than"), "the message lists what is allowed: {message}");
    }

    #[test]
    fn flags_that_decide_what_a_snapshot_is_are_refused() {
        for flag in ["--tag", "--host", "--time", "--parent", "--group-by", "--dry-run", "--skip-if-unchanged"] {
            assert_eq!(check(&[flag, "x"]), not_allowed(0, flag));
        }
        for flag in ["--stdin", "--files-from", "--exclude-file", "--iexclude-file", "--json", "--verbose", "--"] {
            assert_eq!(check(&[flag]), not_allowed(0, flag));
        }
        assert_eq!(check(&["-e", "*.tmp"]), not_allowed(0, "-e"), "short spellings are refused too");
    }

    /// The admission policy shipped in deploy/ allows exactly these flags.
    #[test]
    fn the_admission_policy_allows_the_same_flags() {
        use serde::Deserialize;
        let text = include_str!("../../deploy/base/admission-policy.yaml");
        let policy = serde_yaml::Deserializer::from_str(text)
            .map(|document| serde_json::Value::deserialize(document).expect("YAML"))
            .find(|d| d["kind"] == "ValidatingAdmissionPolicy" && d["metadata"]["name"] == "stash-restic-args")
            .expect("the policy stash-restic-args");
        let variables = policy["spec"]["variables"].as_array().expect("variables");
        let allowed = variables.iter().find(|v| v["name"] == "allowed").expect("the variable `allowed`");
        let list = allowed["expression"].as_str().expect("an expression").trim();
        let listed: Vec<&str> = list
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .expect("a list literal")
            .split(',')
            .map(|flag| flag.trim().trim_matches('\''))
            .collect();
        assert_eq!(listed, ALLOWED.iter().map(|(name, _)| *name).collect::<Vec<_>>());
    }

    #[test]
    fn a_value_must_be_there_and_a_path_is_not_a_flag() {
        let missing = |index, flag: &str| Err(RefusedArg::MissingValue { index, flag: flag.into() });
        assert_eq!(check(&["--one-file-system", "--exclude"]), missing(1, "--exclude"));
        assert_eq!(check(&["--exclude", "--password-command=x"]), missing(0, "--exclude"));
        assert_eq!(check(&["--one-file-system", "/etc"]), Err(RefusedArg::NotAFlag { index: 1 }));
        assert_eq!(check(&[""]), Err(RefusedArg::NotAFlag { index: 0 }));
    }
}
