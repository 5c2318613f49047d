//! The restic driver: builds restic invocations for a Repository and reads their `--json` output.
//! Secrets travel in the environment (or files), never in argv; whatever restic prints is redacted
//! before it becomes an error message.

pub mod backend;
pub mod output;
pub mod secrets;
mod stream;

use backend::Location;
use k8s_openapi::jiff::Timestamp;
use output::{BackupItemError, BackupProgress, BackupReport, BackupSummary, Lock, Snapshot};
use percent_encoding::percent_decode_str;
use secrets::{CA_CERT_DATA, RESTIC_PASSWORD, SecretError, SecretValues};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use stream::{Kept, STDERR_TAIL, Stdout};
use tokio::process::{Child, Command};

/// The restic the Dockerfile ships and the tests build; older releases (Debian's 0.14) work too.
pub const PINNED_VERSION: &str = "0.18.1";
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Environment variable naming the restic binary when `--restic-binary` is not given.
pub const BINARY_ENV: &str = "STASH_RESTIC_BINARY";
/// Snapshot ids passed to one restic run: ~650 KB of arguments, well inside Linux's 2 MiB for a
/// command line under the default stack limit.
pub(crate) const IDS_PER_RUN: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ResticError {
    #[error("starting {binary}: {source}")]
    Spawn { binary: PathBuf, source: std::io::Error },
    #[error("no restic repository at {0}")]
    NoRepository(String),
    #[error("wrong RESTIC_PASSWORD for the repository at {0}")]
    WrongPassword(String),
    #[error("the repository at {0} is locked by another restic process")]
    Locked(String),
    #[error("restic {command} failed ({status}): {message}")]
    Failed { command: String, status: String, message: String },
    #[error(
        "restic {command} does not know a flag stash passes ({message}): stash needs restic {MINIMUM_RELEASE} or later"
    )]
    TooOld { command: String, message: String },
    #[error("restic {command} printed unexpected output: {message}")]
    Output { command: String, message: String },
    #[error("restic {command} skipped a snapshot it could not load ({message}); a partial listing is not acted on")]
    Partial { command: String, message: String },
    #[error("restic {command} printed {what}; the rest was not kept, to bound the executor's memory")]
    TooMuchOutput { command: String, what: String },
    #[error("reading the output of restic {command}: {source}")]
    Read { command: String, source: std::io::Error },
    #[error("the backend at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("writing the CA certificate file: {0}")]
    CaCert(std::io::Error),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// How restic ended, and what was kept of what it printed.
struct Finished {
    status: ExitStatus,
    /// The document asked for; empty when stdout was dropped or handed over line by line.
    stdout: String,
    /// The end of stderr (`stream::STDERR_TAIL`), where restic says why it stopped.
    stderr: String,
}

/// The oldest restic release that knows every flag stash passes (`--retry-lock` came in 0.16). It is
/// not asked for up front: a `restic version` at every opening cost a process start, and an older
/// restic says which flag it does not know, which names the release in the error.
const MINIMUM_RELEASE: &str = "0.16";

/// What restic inherits from the executor's environment; everything else is cleared, so that no
/// credential of the Pod leaks into restic by accident. Proxies (`runtimeSettings` env) and workload
/// identity (a projected token the platform injects) must pass, or proxied clusters and IRSA-style
/// credentials cannot work.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "TMPDIR",
    "HOME",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
];

fn inherited_env(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> Vec<(&'static str, std::ffi::OsString)> {
    INHERITED_ENV.iter().filter_map(|key| lookup(key).map(|value| (*key, value))).collect()
}

/// How long the REST lock DELETE may take: a server that never answers must not hold an executor.
const LOCK_DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// The lock wait of a command run by hand (`stash` CLI); executors wait until their deadline.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// One repository opened with one Secret.
pub struct Restic {
    binary: PathBuf,
    location: Location,
    secrets: SecretValues,
    password: String,
    /// How long a command waits for another process's lock before failing (`--retry-lock`).
    lock_wait: Duration,
    /// The largest document kept from stdout (`stream::DOCUMENT_LIMIT`).
    document_limit: usize,
    /// Holds the CA file (when the Secret has CA_CERT_DATA) and, by default, restic's cache.
    scratch: tempfile::TempDir,
    cache: Cache,
    /// `nice`/`ionice` and their arguments, run in front of restic; empty for none.
    priority: Vec<String>,
    /// Where backups send restic's progress, if anyone watches.
    progress: Option<tokio::sync::watch::Sender<BackupProgress>>,
}

/// Where restic keeps its cache (indexes, snapshot and tree data it would otherwise download).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cache {
    /// In this process's scratch directory, gone with it (the CLI, finalize and restore Jobs).
    Scratch,
    /// In a directory that outlives this process (a sidecar's scratch volume lasts as long as its Pod).
    Dir(PathBuf),
    /// None at all (`--no-cache`; Stash's `tempDir.disableCaching`).
    Off,
}

/// The `nice` and `ionice` words that run a command at the given CPU niceness and I/O class/level
/// (Stash's `runtimeSettings.container.nice` / `ionice`). `ionice -t`: a class the process may not
/// take (realtime without CAP_SYS_NICE) is skipped rather than failing the backup.
pub fn priority_prefix(nice: Option<i32>, ionice: Option<(i32, Option<i32>)>) -> Vec<String> {
    let mut words = Vec::new();
    if let Some(adjustment) = nice {
        words.extend(["nice".to_string(), "-n".into(), adjustment.to_string()]);
    }
    if let Some((class, level)) = ionice {
        words.extend(["ionice".to_string(), "-t".into(), "-c".into(), class.to_string()]);
        if let Some(level) = level {
            words.extend(["-n".to_string(), level.to_string()]);
        }
    }
    words
}

/// What `restic backup` gets for a tree of files.
#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    /// restic runs here, and `paths` are given relative to it, so that a tree mounted elsewhere (a
    /// test's directory, a restore Job's volume) keeps the paths the application sees.
    pub root: PathBuf,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub host: String,
    pub tags: Vec<String>,
    /// A member's `target.args`, checked by `BackupTarget::check_args` before they come here.
    pub extra_args: Vec<String>,
}

/// A finished backup: restic's summary plus the items it could not read (how many, and the first
/// few by name).
#[derive(Debug)]
pub struct BackupOutcome {
    pub summary: BackupSummary,
    pub unreadable: Vec<BackupItemError>,
    pub unreadable_count: usize,
}

impl Restic {
    /// Resolves the binary (flag, then `STASH_RESTIC_BINARY`, then `restic` on PATH), without running it.
    pub fn open(binary: Option<PathBuf>, location: Location, secrets: SecretValues) -> Result<Self, ResticError> {
        let binary = binary
            .or_else(|| std::env::var_os(BINARY_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("restic"));
        let password = secrets.require(RESTIC_PASSWORD)?.to_string();
        let scratch = tempfile::Builder::new().prefix("stash-restic-").tempdir().map_err(ResticError::CaCert)?;
        if let Some(ca) = secrets.get(CA_CERT_DATA) {
            std::fs::write(scratch.path().join("ca.crt"), ca).map_err(ResticError::CaCert)?;
        }
        Ok(Restic {
            binary,
            location,
            secrets,
            password,
            lock_wait: DEFAULT_LOCK_WAIT,
            document_limit: stream::DOCUMENT_LIMIT,
            scratch,
            cache: Cache::Scratch,
            priority: Vec::new(),
            progress: None,
        })
    }

    /// Waits up to `limit` for other processes' locks. Executors pass their deadline: a backup of
    /// another batch may hold the repository for as long as its session runs, and a finalize that
    /// gave up after a fixed two minutes would fail while nothing is wrong.
    pub fn waiting_for_locks(mut self, limit: Duration) -> Self {
        self.lock_wait = limit;
        self
    }

    /// Runs `f` with this repository's commands failing at once on another process's lock instead
    /// of waiting for it, so that the caller can look at the lock first.
    pub async fn without_lock_wait<T>(&mut self, f: impl AsyncFnOnce(&Restic) -> T) -> T {
        self.waiting_at_most(Duration::ZERO, f).await
    }

    /// Runs `f` with this repository's commands waiting at most `wait` for another process's lock.
    pub async fn waiting_at_most<T>(&mut self, wait: Duration, f: impl AsyncFnOnce(&Restic) -> T) -> T {
        let before = std::mem::replace(&mut self.lock_wait, wait);
        let result = f(self).await;
        self.lock_wait = before;
        result
    }

    /// Backups from now on send restic's progress lines here.
    pub fn reporting_progress(mut self, sink: tokio::sync::watch::Sender<BackupProgress>) -> Self {
        self.progress = Some(sink);
        self
    }

    /// Where restic keeps its cache from now on.
    pub fn caching(mut self, cache: Cache) -> Self {
        self.cache = cache;
        self
    }

    /// Runs restic behind `prefix` (see `priority_prefix`).
    pub fn with_priority(mut self, prefix: Vec<String>) -> Self {
        self.priority = prefix;
        self
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn secrets(&self) -> &SecretValues {
        &self.secrets
    }

    /// A restic command with the repository's environment and global flags.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = match self.priority.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command.env_clear();
        command.envs(inherited_env(|key| std::env::var_os(key)));
        if !self.priority.is_empty()
            && let Some(path) = std::env::var_os("PATH")
        {
            // `nice` and `ionice` find the next program (restic) on PATH.
            command.env("PATH", path);
        }
        command
            .env("RESTIC_REPOSITORY", &self.location.url)
            .env("RESTIC_PASSWORD", &self.password)
            .envs(self.location.env.iter().map(|(k, v)| (k, v)));
        match &self.cache {
            Cache::Scratch => {
                command.env("RESTIC_CACHE_DIR", self.scratch.path().join("cache"));
            }
            Cache::Dir(dir) => {
                // Old caches of other repositories are dropped, so the directory does not grow.
                command.env("RESTIC_CACHE_DIR", dir).arg("--cleanup-cache");
            }
            Cache::Off => {
                command.arg("--no-cache");
            }
        }
        for option in &self.location.options {
            command.arg("-o").arg(option);
        }
        if self.location.insecure_tls {
            command.arg("--insecure-tls");
        }
        let ca = self.scratch.path().join("ca.crt");
        if ca.exists() {
            command.arg("--cacert").arg(ca);
        }
        // Wait for another process's lock instead of failing at once.
        if !self.lock_wait.is_zero() {
            command.arg("--retry-lock").arg(format!("{}s", self.lock_wait.as_secs().max(1)));
        }
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        command
    }

    /// Runs restic to its end and returns its stdout, one document (`snapshots --json`, a dumped
    /// file), bounded; a non-zero exit is an error that says what restic said.
    pub async fn run(&self, args: &[&str]) -> Result<String, ResticError> {
        self.run_reading(args, Stdout::Document { limit: self.document_limit }).await.map(|f| f.stdout)
    }

    /// Runs a restic command that loads the repository's snapshots and prints them as one document,
    /// refused when restic skipped one (see [`Restic::refuse_skipped`]).
    pub(crate) async fn run_listing(&self, args: &[&str]) -> Result<String, ResticError> {
        let finished = self.run_reading(args, Stdout::Document { limit: self.document_limit }).await?;
        self.refuse_skipped(args, finished).map(|f| f.stdout)
    }

    /// restic skips a snapshot it cannot load ("Ignoring …: failed to load snapshot") and still
    /// exits 0. Retention must not act on that: a listing without the snapshot would judge its
    /// session incomplete, or not kept by the policy, and forget the rest of it; a forget of a
    /// manifest that skipped it would let the forget of its data leave it without data. A snapshot
    /// whose file is gone (forgotten meanwhile) is no snapshot: skipping it is the truth.
    fn refuse_skipped(&self, args: &[&str], finished: Finished) -> Result<Finished, ResticError> {
        let gone =
            |line: &str| ["no such file or directory", "does not exist", "(404)"].iter().any(|g| line.contains(g));
        let skipped = finished.stderr.lines().find(|l| l.contains("failed to load snapshot") && !gone(l));
        match skipped {
            Some(line) => Err(ResticError::Partial {
                command: args.first().copied().unwrap_or_default().to_string(),
                message: self.secrets.redact(line.trim()),
            }),
            None => Ok(finished),
        }
    }

    /// Runs restic for its effect; its stdout is read and dropped.
    pub(crate) async fn run_quiet(&self, args: &[&str]) -> Result<(), ResticError> {
        self.run_reading(args, Stdout::Discard).await.map(drop)
    }

    /// Runs restic, handing each line of its stdout to `on_line` as it arrives (`ls --json`).
    pub(crate) async fn run_lines(
        &self,
        args: &[&str],
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), ResticError> {
        self.run_reading(args, Stdout::Lines(on_line)).await.map(drop)
    }

    async fn run_reading(&self, args: &[&str], stdout: Stdout<'_>) -> Result<Finished, ResticError> {
        let finished = self.finish(self.spawn(self.command(args))?, args, stdout).await?;
        if finished.status.success() { Ok(finished) } else { Err(self.failure(args, &finished)) }
    }

    fn spawn(&self, mut command: Command) -> Result<Child, ResticError> {
        command.spawn().map_err(|source| ResticError::Spawn { binary: self.binary.clone(), source })
    }

    /// Waits for a started restic, reading its stdout (what the caller has not taken) as `stdout`
    /// says and keeping the end of its stderr. Output past a limit is an error: the caller would
    /// otherwise act on part of what restic said.
    async fn finish(&self, mut child: Child, args: &[&str], stdout: Stdout<'_>) -> Result<Finished, ResticError> {
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let (kept, stderr, status) = tokio::join!(
            async {
                match out {
                    Some(pipe) => stream::read_stdout(pipe, stdout).await,
                    None => Ok(Kept::default()),
                }
            },
            async {
                match err {
                    Some(pipe) => stream::read_tail(pipe, STDERR_TAIL).await,
                    None => Ok(String::new()),
                }
            },
            child.wait(),
        );
        let command = args.first().copied().unwrap_or_default().to_string();
        let status = status.map_err(|source| ResticError::Spawn { binary: self.binary.clone(), source })?;
        let (kept, stderr) = match (kept, stderr) {
            (Ok(kept), Ok(stderr)) => (kept, stderr),
            (Err(source), _) | (_, Err(source)) => return Err(ResticError::Read { command, source }),
        };
        if let Some(what) = kept.overflow {
            return Err(ResticError::TooMuchOutput { command, what });
        }
        Ok(Finished { status, stdout: kept.document, stderr })
    }

    /// Turns a failed run into an error, recognising the cases a user can act on.
    fn failure(&self, args: &[&str], finished: &Finished) -> ResticError {
        let url = self.location.display_url();
        let stderr = &finished.stderr;
        let code = finished.status.code();
        if code == Some(10) || stderr.contains("Is there a repository at the following location?") {
            return ResticError::NoRepository(url);
        }
        if code == Some(12) || stderr.contains("wrong password or no key found") {
            return ResticError::WrongPassword(url);
        }
        if code == Some(11) || stderr.contains("repository is already locked") {
            return ResticError::Locked(url);
        }
        if let Some(line) = stderr.lines().find(|l| l.contains("unknown flag")) {
            let command = args.first().copied().unwrap_or_default().to_string();
            return ResticError::TooOld { command, message: self.secrets.redact(line.trim()) };
        }
        // With --json restic says why it exits as JSON (`exit_error`); other JSON lines are progress.
        let said = |line: &str| match line.starts_with('{') {
            true => serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .filter(|v| v["message_type"] == "exit_error")
                .and_then(|v| v["message"].as_str().map(str::to_string)),
            false => Some(line.to_string()),
        };
        let message = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .filter_map(said)
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("; ");
        ResticError::Failed {
            command: args.first().copied().unwrap_or_default().to_string(),
            status: finished.status.to_string(),
            message: self.secrets.redact(if message.is_empty() { "no message" } else { &message }),
        }
    }

    /// Fails fast when a network backend does not accept connections: restic itself would retry
    /// for 15 minutes before saying so.
    pub async fn probe(&self) -> Result<(), ResticError> {
        let Some(endpoint) = self.location.network_endpoint() else { return Ok(()) };
        let unreachable = |reason: String| ResticError::Unreachable { url: self.location.display_url(), reason };
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(endpoint.as_str())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(unreachable(format!("connecting to {endpoint}: {err}"))),
            Err(_) => Err(unreachable(format!("connecting to {endpoint}: no answer in {}s", PROBE_TIMEOUT.as_secs()))),
        }
    }

    /// A repository in a local directory (answers some questions without restic).
    pub fn is_local(&self) -> bool {
        self.location.local_dir.is_some()
    }

    /// Whether the repository exists (after a reachability probe). A local repository's directory
    /// answers without restic, whose every opening costs a key derivation (~0.5 s).
    pub async fn exists(&self) -> Result<bool, ResticError> {
        if let Some(dir) = &self.location.local_dir {
            return Ok(dir.join("config").is_file());
        }
        self.probe().await?;
        match self.run_quiet(&["cat", "config", "--no-lock"]).await {
            Ok(_) => Ok(true),
            Err(ResticError::NoRepository(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// `restic init`. Not safe against a concurrent init of the same repository: callers hold the
    /// repository's Lease.
    pub async fn init(&self) -> Result<(), ResticError> {
        self.run_quiet(&["init"]).await
    }

    fn tag_args(tags: &[String]) -> Vec<String> {
        tags.iter().flat_map(|t| ["--tag".to_string(), t.clone()]).collect()
    }

    /// `restic backup` of files. Exit 3 (a snapshot without some unreadable files) is reported as
    /// an outcome with `unreadable` entries; the caller decides.
    pub async fn backup(&self, request: &BackupRequest) -> Result<BackupOutcome, ResticError> {
        let mut args: Vec<String> = vec!["backup".into(), "--json".into(), "--host".into(), request.host.clone()];
        args.extend(Self::tag_args(&request.tags));
        for pattern in &request.exclude {
            args.push("--exclude".into());
            args.push(pattern.clone());
        }
        args.extend(request.extra_args.iter().cloned());
        args.push("--".into());
        args.extend(request.paths.iter().map(|p| relative_to_root(p)));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = self.command(&argv);
        command.current_dir(&request.root);
        self.backup_outcome(&argv, command).await
    }

    /// `restic backup --stdin` fed from `stdin` (a dump command's output), dated `time` if given.
    pub async fn backup_stdin(
        &self,
        filename: &str,
        host: &str,
        tags: &[String],
        time: Option<Timestamp>,
        stdin: Stdio,
    ) -> Result<BackupOutcome, ResticError> {
        let mut args: Vec<String> = vec!["backup".into(), "--json".into(), "--host".into(), host.into()];
        args.extend(Self::tag_args(tags));
        args.extend(["--stdin".into(), "--stdin-filename".into(), filename.into()]);
        if let Some(time) = time {
            // restic reads --time in the local zone: pin the zone so the instant is exact.
            args.extend(["--time".into(), time.strftime("%Y-%m-%d %H:%M:%S").to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = self.command(&argv);
        if time.is_some() {
            command.env("TZ", "UTC");
        }
        command.stdin(stdin);
        self.backup_outcome(&argv, command).await
    }

    /// Runs a `backup --json` command, reading its progress, errors and summary as they come.
    async fn backup_outcome(&self, argv: &[&str], mut command: Command) -> Result<BackupOutcome, ResticError> {
        // restic prints 60 status lines a second in JSON mode; a few are plenty for anyone watching.
        command.env("RESTIC_PROGRESS_FPS", if self.progress.is_some() { "1" } else { "0.1" });
        let mut report = BackupReport { progress: self.progress.as_ref(), ..Default::default() };
        let finished = self.finish(self.spawn(command)?, argv, Stdout::Lines(&mut |line| report.line(line))).await?;
        match (finished.status.code(), report.summary) {
            (Some(0 | 3), Some(summary)) if !summary.snapshot_id.is_empty() => {
                Ok(BackupOutcome { summary, unreadable: report.unreadable, unreadable_count: report.unreadable_count })
            }
            (Some(0), _) => {
                Err(ResticError::Output { command: "backup".into(), message: "no summary with a snapshot id".into() })
            }
            _ => Err(self.failure(argv, &finished)),
        }
    }

    /// Snapshots carrying every tag in `tags`.
    pub async fn snapshots(&self, tags: &[String]) -> Result<Vec<Snapshot>, ResticError> {
        let mut args = vec!["snapshots".to_string(), "--json".into(), "--no-lock".into()];
        if !tags.is_empty() {
            args.push("--tag".into());
            args.push(tags.join(","));
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let printed = self.run_listing(&argv).await?;
        let text = printed.trim();
        if text.is_empty() || text == "null" {
            return Ok(Vec::new());
        }
        serde_json::from_str(text)
            .map_err(|err| ResticError::Output { command: "snapshots".into(), message: err.to_string() })
    }

    /// Forgets the snapshots `ids`.
    /// Forgets `ids`, [`IDS_PER_RUN`] at a time: a long history's ids do not fit one command line.
    pub async fn forget(&self, ids: &[String]) -> Result<(), ResticError> {
        for chunk in ids.chunks(IDS_PER_RUN) {
            let mut args = vec!["forget"];
            args.extend(chunk.iter().map(String::as_str));
            let finished = self.run_reading(&args, Stdout::Discard).await?;
            self.refuse_skipped(&args, finished)?;
        }
        Ok(())
    }

    pub async fn prune(&self) -> Result<(), ResticError> {
        self.run_quiet(&["prune"]).await
    }

    /// `restic check`: true when the repository has no errors. A damaged repository may be reported
    /// in millions of lines: each is looked at for an error as it comes, none is kept.
    pub async fn check(&self) -> Result<bool, ResticError> {
        let mut reported_error = false;
        let mut on_line = |line: &str| reported_error |= line.contains("error");
        let finished =
            self.finish(self.spawn(self.command(&["check"]))?, &["check"], Stdout::Lines(&mut on_line)).await?;
        match finished.status.code() {
            Some(0) => Ok(true),
            Some(1) if reported_error || finished.stderr.contains("error") => Ok(false),
            _ => Err(self.failure(&["check"], &finished)),
        }
    }

    /// Bytes the snapshots `ids` (all when empty) hold in the repository, after deduplication and
    /// compression.
    pub async fn stored_size(&self, ids: &[&str]) -> Result<u64, ResticError> {
        #[derive(serde::Deserialize)]
        struct Stats {
            total_size: u64,
        }
        let mut args = vec!["stats", "--json", "--no-lock", "--mode", "raw-data"];
        args.extend(ids);
        let printed = self.run(&args).await?;
        serde_json::from_str::<Stats>(printed.trim())
            .map(|s| s.total_size)
            .map_err(|err| ResticError::Output { command: "stats".into(), message: err.to_string() })
    }

    /// Every lock file with its content; a lock removed meanwhile is skipped. An empty local `locks`
    /// directory answers without opening the repository.
    pub async fn locks(&self) -> Result<Vec<(String, Lock)>, ResticError> {
        if let Some(dir) = &self.location.local_dir
            && std::fs::read_dir(dir.join("locks")).map_or(true, |mut entries| entries.next().is_none())
        {
            return Ok(Vec::new());
        }
        let listed = self.run(&["list", "locks", "--no-lock"]).await?;
        let mut locks = Vec::new();
        for id in listed.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Ok(printed) = self.run(&["cat", "lock", id, "--no-lock"]).await
                && let Ok(lock) = serde_json::from_str::<Lock>(printed.trim())
            {
                locks.push((id.to_string(), lock));
            }
        }
        Ok(locks)
    }

    /// The repository's clock, for a local directory: the mtime of a file written there now. None
    /// elsewhere: restic reports only the time a holder wrote into its lock, by the holder's clock.
    pub fn clock(&self) -> Option<std::time::SystemTime> {
        let dir = self.location.local_dir.as_ref()?;
        let probe = tempfile::Builder::new().prefix(".stash-clock-").tempfile_in(dir).ok()?;
        probe.as_file().metadata().ok()?.modified().ok()
    }

    /// When lock `id` was last written, by the repository's clock (local directories only). restic
    /// refreshes a lock by writing a new lock file, so this is its last refresh.
    pub fn lock_written(&self, id: &str) -> Option<std::time::SystemTime> {
        let dir = self.location.local_dir.as_ref()?;
        std::fs::metadata(dir.join("locks").join(id)).ok()?.modified().ok()
    }

    /// Deletes one lock file where the backend allows it without restic — a local directory, or a
    /// REST server (`DELETE /locks/<id>`); false where only restic can (after 30 minutes).
    pub async fn remove_lock(&self, id: &str) -> bool {
        if let Some(dir) = &self.location.local_dir {
            return std::fs::remove_file(dir.join("locks").join(id)).is_ok();
        }
        let Some(base) = self.location.url.strip_prefix("rest:") else { return false };
        let Ok(mut url) = reqwest::Url::parse(&format!("{}/locks/{id}", base.trim_end_matches('/'))) else {
            return false;
        };
        let user = percent_decode_str(url.username()).decode_utf8_lossy().into_owned();
        let password = url.password().map(|p| percent_decode_str(p).decode_utf8_lossy().into_owned());
        let _ = url.set_username("");
        let _ = url.set_password(None);
        // The same trust as restic's own requests: the repository's CA and its insecureTLS choice.
        let mut client = reqwest::Client::builder()
            .timeout(LOCK_DELETE_TIMEOUT)
            .danger_accept_invalid_certs(self.location.insecure_tls);
        let ca = std::fs::read(self.scratch.path().join("ca.crt")).ok();
        if let Some(certificate) = ca.and_then(|pem| reqwest::Certificate::from_pem(&pem).ok()) {
            client = client.add_root_certificate(certificate);
        }
        let Ok(client) = client.build() else { return false };
        let mut request = client.delete(url);
        if !user.is_empty() {
            request = request.basic_auth(user, password);
        }
        request.send().await.is_ok_and(|r| r.status().is_success())
    }

    /// `restic unlock`: removes the locks restic itself proves stale (its host's process is gone, or
    /// it was not refreshed for 30 minutes). Never `--remove-all`, which would break a live lock.
    pub async fn unlock_stale(&self) -> Result<(), ResticError> {
        self.run_quiet(&["unlock"]).await
    }

    /// Restores `snapshot` (or `snapshot:subfolder`) into `target`, only what `include` matches
    /// (everything when empty) and nothing `exclude` matches.
    pub async fn restore(
        &self,
        snapshot: &str,
        target: &Path,
        include: &[String],
        exclude: &[String],
    ) -> Result<(), ResticError> {
        let target = target.to_string_lossy();
        let mut args = vec!["restore", snapshot, "--target", &target];
        for pattern in include {
            args.push("--include");
            args.push(pattern);
        }
        for pattern in exclude {
            args.push("--exclude");
            args.push(pattern);
        }
        self.run_quiet(&args).await
    }

    /// Waits for a restic started with `dump` whose stdout the caller consumed.
    pub async fn finish_child(&self, child: Child) -> Result<(), ResticError> {
        let finished = self.finish(child, &["dump"], Stdout::Discard).await?;
        if finished.status.success() { Ok(()) } else { Err(self.failure(&["dump"], &finished)) }
    }

    /// Starts `restic dump <snapshot> <file>`, its stdout piped for the caller to consume.
    pub fn dump(&self, snapshot: &str, file: &str) -> Result<Child, ResticError> {
        self.spawn(self.command(&["dump", snapshot, file]))
    }
}

/// `/var/lib/app` → `var/lib/app`: restic runs in the root, so the snapshot keeps the full path.
fn relative_to_root(path: &str) -> String {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() { ".".into() } else { trimmed.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Restic` for `binary` at `url`, as `open` would make it for restic 0.18.1.
    fn restic_at(binary: PathBuf, url: String) -> Restic {
        Restic {
            binary,
            location: Location { url, options: Vec::new(), env: Vec::new(), insecure_tls: false, local_dir: None },
            secrets: SecretValues::from_map("/secret", Default::default()),
            password: String::new(),
            lock_wait: DEFAULT_LOCK_WAIT,
            document_limit: stream::DOCUMENT_LIMIT,
            scratch: tempfile::tempdir().expect("scratch"),
            cache: Cache::Scratch,
            priority: Vec::new(),
            progress: None,
        }
    }

    /// A stand-in for restic: a shell script that runs `body` whatever it is asked.
    fn fake_restic(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("restic");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write the script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("make it executable");
        path
    }

    /// Stash's `nice`/`ionice` settings run restic behind `nice` and `ionice`, which find it with
    /// the executor's PATH (restic's own environment is otherwise cleared).
    #[tokio::test]
    async fn restic_runs_at_the_members_cpu_and_io_priority() {
        assert_eq!(priority_prefix(None, None), Vec::<String>::new());
        assert_eq!(
            priority_prefix(Some(10), Some((2, Some(7)))),
            ["nice", "-n", "10", "ionice", "-t", "-c", "2", "-n", "7"]
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let script = fake_restic(dir.path(), "echo \"$(nice) $(ionice)\"");
        let base: i32 = String::from_utf8_lossy(&std::process::Command::new("nice").output().expect("nice").stdout)
            .trim()
            .parse()
            .expect("a niceness");
        let restic = restic_at(script, "/repo".into()).with_priority(priority_prefix(Some(5), Some((3, None))));
        let printed = restic.run(&["version"]).await.expect("restic runs behind nice and ionice");
        assert_eq!(printed.trim(), format!("{} idle", (base + 5).min(19)), "niceness and I/O class");
    }

    /// Opening a repository starts no restic: every run is a process start, and `restic version`
    /// was a third of what a backup added to restic's own time (BENCHMARKS.md).
    #[tokio::test]
    async fn opening_a_repository_runs_no_restic() {
        let dir = tempfile::tempdir().expect("dir");
        let calls = dir.path().join("calls");
        let script = fake_restic(
            dir.path(),
            &format!("echo \"$*\" >> '{}'\necho 'restic 0.18.1 compiled with go1.25 on linux/amd64'", calls.display()),
        );
        let location = Location {
            url: dir.path().join("repo").to_string_lossy().into_owned(),
            options: Vec::new(),
            env: Vec::new(),
            insecure_tls: false,
            local_dir: None,
        };
        let secrets = SecretValues::from_map("/secret", [(RESTIC_PASSWORD.to_string(), "pw".to_string())].into());
        Restic::open(Some(script), location, secrets).expect("opened");
        let ran = std::fs::read_to_string(&calls).unwrap_or_default();
        assert_eq!(ran, "", "restic ran while opening");
    }

    /// A forget of more ids than fit one command line (a policy added to a long history) runs in
    /// several restic runs that name every id once.
    #[tokio::test]
    async fn a_forget_of_many_ids_fits_the_command_line() {
        let dir = tempfile::tempdir().expect("dir");
        let calls = dir.path().join("calls");
        let counting = format!(
            "n=0; for a in \"$@\"; do case $a in id-*) n=$((n+1));; esac; done; echo $n >> '{}'",
            calls.display()
        );
        let restic = restic_at(fake_restic(dir.path(), &counting), dir.path().join("repo").to_string_lossy().into());
        // 64 characters each, as restic's ids: 2.6 MB of arguments in all.
        let ids: Vec<String> = (0..40_000).map(|i| format!("id-{i:061}")).collect();
        restic.forget(&ids).await.expect("forgotten");
        let runs: Vec<usize> =
            std::fs::read_to_string(&calls).expect("restic ran").lines().map(|l| l.parse().expect("a count")).collect();
        assert!(runs.iter().all(|&n| n <= IDS_PER_RUN), "{runs:?}");
        assert_eq!(runs.iter().sum::<usize>(), ids.len(), "{runs:?}");
    }

    /// A listing, or a forget, in which restic skipped a snapshot it could not load is an error,
    /// not a listing without that snapshot or a forget that left it.
    #[tokio::test]
    async fn a_listing_or_forget_that_skipped_a_snapshot_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let body =
            "echo '[]'\necho 'Ignoring \"329d823a\": failed to load snapshot 329d823a: invalid data returned' >&2";
        let restic = restic_at(fake_restic(dir.path(), body), dir.path().join("repo").to_string_lossy().into());
        let listed = restic.snapshots(&[]).await.map(|s| s.len()).map_err(|e| e.to_string());
        let message = listed.expect_err("a partial listing");
        assert!(message.contains("failed to load snapshot 329d823a"), "{message}");
        let forgot = restic.forget(&["329d823a".to_string()]).await.map_err(|e| e.to_string());
        assert!(forgot.expect_err("a partial forget").contains("failed to load snapshot"));
        // One whose file is gone (another process forgot it meanwhile) is not in the repository.
        let gone = "echo '[]'\necho 'Ignoring \"11\": failed to load snapshot 11: open r/snapshots/11: no such file or directory' >&2";
        let restic = restic_at(fake_restic(dir.path(), gone), dir.path().join("repo").to_string_lossy().into());
        assert_eq!(restic.snapshots(&[]).await.map(|s| s.len()).map_err(|e| e.to_string()), Ok(0));
    }

    /// Why restic exits, which it prints as JSON under `--json`, is the error's message.
    #[tokio::test]
    async fn a_failure_reported_as_json_says_why() {
        let dir = tempfile::tempdir().expect("dir");
        let refusal = r#"{"message_type":"exit_error","code":1,"message":"refusing to delete last snapshot"}"#;
        let body = format!("echo '{{\"message_type\":\"status\"}}' >&2\necho '{refusal}' >&2\nexit 1");
        let restic = restic_at(fake_restic(dir.path(), &body), dir.path().join("repo").to_string_lossy().into());
        let failed = restic.run(&["forget", "--json"]).await.map_err(|e| e.to_string());
        let message = failed.expect_err("restic failed");
        assert!(message.ends_with("refusing to delete last snapshot"), "{message}");
    }

    /// A restic too old for a flag stash passes says which release stash needs, besides restic's words.
    #[tokio::test]
    async fn a_restic_too_old_for_our_flags_is_named_as_such() {
        let dir = tempfile::tempdir().expect("dir");
        let script = fake_restic(dir.path(), "echo 'unknown flag: --retry-lock' >&2\nexit 1");
        let restic = restic_at(script, dir.path().join("repo").to_string_lossy().into_owned());
        let failed = restic.snapshots(&[]).await.map(|s| s.len());
        let message = failed.map_err(|e| e.to_string()).expect_err("an unknown flag fails");
        assert!(message.contains("unknown flag: --retry-lock"), "{message}");
        assert!(message.contains("restic 0.16 or later"), "{message}");
    }

    /// This process's peak resident memory so far (VmHWM), in bytes.
    fn peak_resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("a VmHWM line");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB");
        kib * 1024
    }

    /// The tests that measure peak memory run one at a time: the peak is the whole process's.
    static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// How much restic's output may add to the executor's peak memory: far below the 200 MB printed.
    const MEMORY_BOUND: u64 = 48 << 20;

    /// L4: a restic that prints 200 MB of retries to stderr and fails: what is kept of stderr is
    /// bounded and ends with restic's last line, and the executor's memory does not follow the output.
    #[tokio::test]
    async fn two_hundred_megabytes_of_stderr_keep_a_bounded_tail_with_the_last_line() {
        let _one_at_a_time = MEASURING.lock().await;
        let dir = tempfile::tempdir().expect("dir");
        let script = fake_restic(
            dir.path(),
            "yes 'Load(<data/0123abcd>, 0, 0) returned error, retrying after 1.2s: connection reset by peer' \
               | head -c 200000000 >&2\n\
             echo >&2\n\
             echo 'Fatal: unable to load index 0123abcd: the last line' >&2\n\
             exit 1",
        );
        let restic = restic_at(script, dir.path().join("repo").to_string_lossy().into_owned());
        let before = peak_resident_bytes();
        let args = ["snapshots", "--json"];
        let child = restic.spawn(restic.command(&args)).expect("restic starts");
        let finished = restic.finish(child, &args, Stdout::Discard).await.expect("restic ran");
        let grown = peak_resident_bytes().saturating_sub(before);
        eprintln!("peak resident memory grew by {} KiB", grown >> 10);
        assert!(finished.stderr.len() <= 64 << 10, "{} bytes of stderr kept", finished.stderr.len());
        assert!(finished.stderr.ends_with("Fatal: unable to load index 0123abcd: the last line\n"));
        let failure = restic.failure(&["snapshots"], &finished).to_string();
        assert!(failure.ends_with("Fatal: unable to load index 0123abcd: the last line"), "{failure}");
        assert!(grown < MEMORY_BOUND, "peak memory grew by {} MiB", grown >> 20);
    }

    /// L4: a backup that could not read a million files: each is counted, a few are kept to name them,
    /// and the summary after them is found.
    #[tokio::test]
    async fn a_million_unreadable_files_are_counted_not_kept() {
        let _one_at_a_time = MEASURING.lock().await;
        let dir = tempfile::tempdir().expect("dir");
        let script = fake_restic(
            dir.path(),
            r#"yes '{"message_type":"error","error":{"message":"open /data/f: permission denied"},"during":"archival","item":"/data/f"}' | head -n 1000000
echo '{"message_type":"summary","files_new":1,"total_files_processed":1000001,"snapshot_id":"0123abcd"}'
exit 3"#,
        );
        let restic = restic_at(script, dir.path().join("repo").to_string_lossy().into_owned());
        let request =
            BackupRequest { root: dir.path().to_path_buf(), paths: vec!["/data".into()], ..Default::default() };
        let before = peak_resident_bytes();
        let outcome = restic.backup(&request).await.expect("a snapshot with unreadable files");
        let grown = peak_resident_bytes().saturating_sub(before);
        eprintln!("peak resident memory grew by {} KiB", grown >> 10);
        assert_eq!(outcome.summary.snapshot_id, "0123abcd");
        assert_eq!(outcome.unreadable_count, 1_000_000);
        assert!(outcome.unreadable.len() <= 3, "{} unreadable files kept", outcome.unreadable.len());
        assert!(grown < MEMORY_BOUND, "peak memory grew by {} MiB", grown >> 20);
    }

    /// L4: one document (`snapshots --json`) larger than restic ever prints for a sane repository
    /// fails with a clear error instead of growing without bound.
    #[tokio::test]
    async fn an_oversized_document_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("dir");
        let script = fake_restic(
            dir.path(),
            r#"printf '['
yes '{"id":"0123abcd","time":"2026-11-25T07:00:00Z","hostname":"h","tags":["batch=b"]},' | head -n 100000
echo '{"id":"0123abcd","time":"2026-11-25T07:00:00Z"}]'"#,
        );
        // A small limit stands for the real one: the same code path without holding 64 MiB here.
        let restic = Restic {
            document_limit: 1 << 20,
            ..restic_at(script, dir.path().join("repo").to_string_lossy().into_owned())
        };
        let refused = restic.snapshots(&[]).await.map(|s| s.len());
        let message = refused.as_ref().map_err(ToString::to_string).expect_err("an oversized listing is refused");
        assert!(message.contains("restic snapshots printed more than 1 MiB on stdout"), "{message}");
    }

    /// L4: a REST server that accepts the connection and never answers must not hold the executor:
    /// the lock DELETE gives up after its timeout.
    #[tokio::test]
    async fn a_lock_delete_to_a_silent_rest_server_gives_up() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let _held = std::thread::spawn(move || {
            let accepted: Vec<_> = listener.incoming().take(2).collect();
            std::thread::sleep(Duration::from_secs(120));
            drop(accepted);
        });
        let restic = restic_at(PathBuf::from("restic"), format!("rest:http://127.0.0.1:{port}/repo"));
        let removed = tokio::time::timeout(Duration::from_secs(60), restic.remove_lock("0123abcd")).await;
        assert_eq!(removed.ok(), Some(false), "the DELETE gave up and reported the lock not removed");
    }

    /// M10: proxies and workload-identity variables reach restic; other variables of the Pod do not.
    #[test]
    fn restic_inherits_proxies_and_workload_identity_only() {
        let pod_env = |key: &str| {
            ["HTTPS_PROXY", "NO_PROXY", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "DATABASE_PASSWORD", "PATH"]
                .contains(&key)
                .then(|| std::ffi::OsString::from(format!("value of {key}")))
        };
        let passed: Vec<&str> = inherited_env(pod_env).into_iter().map(|(key, _)| key).collect();
        assert_eq!(passed, ["PATH", "HTTPS_PROXY", "NO_PROXY", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"]);
    }

    #[test]
    fn paths_become_relative_to_the_root() {
        assert_eq!(relative_to_root("/var/lib/app"), "var/lib/app");
        assert_eq!(relative_to_root("/"), ".");
        assert_eq!(relative_to_root("data"), "data");
    }
}
