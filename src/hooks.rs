//! Global hooks of a session: run at most once before the first and after the last member.
//!
//! At most once, whatever runs them (a conflict retry, a stale cache, a leader change, a second
//! operator on the cluster): a controller first records its claim on the hook in the session's
//! status — a write guarded by resourceVersion, so only one claim can land — and acts only after
//! that write succeeded. [`step`] reads where a hook stands from that record.
//!
//! Where a hook runs: `exec` hooks in the batch's workload Pods (through the API server, by the
//! claimant); `httpGet`, `httpPost` and `tcpSocket` hooks from a Job of the batch's own namespace, as
//! its executor identity, so that a tenant never borrows the operator's network position. That Job's
//! Pod marks the hook as being sent (again a guarded write) before sending it, and a Pod that finds
//! it marked sends nothing: a retried Pod or a re-created Job cannot send it twice.

use crate::api::backup_batch::BackupHooks;
use crate::api::common::{Condition, ConditionStatus, Handler, HookExecutionPolicy, UriScheme};
use crate::conditions::Desired;
use crate::executor_pod::SIDECAR_NAME;
use crate::restic::backend::percent_encode;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, AttachParams, ListParams};
use kube::core::Selector;
use std::time::Duration;

const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a claim its holder may still be running an exec hook: the hook's own timeout plus
/// the time to write the outcome. Past that, the claimant is gone and the outcome is unknown.
const CLAIM_GRACE: SignedDuration = SignedDuration::from_secs(45);
/// How often a hook's running Job is looked at besides its own events.
const JOB_POLL: SignedDuration = SignedDuration::from_secs(30);

pub const PRE_BACKUP: &str = "PreBackupHookExecutionSucceeded";
pub const POST_BACKUP: &str = "PostBackupHookExecutionSucceeded";
const CLAIMED: &str = "HookClaimed";
const SENDING: &str = "HookSending";

/// A session's global hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    PreBackup,
    PostBackup,
}

impl Hook {
    /// The session condition that records it.
    pub fn condition(self) -> &'static str {
        match self {
            Hook::PreBackup => PRE_BACKUP,
            Hook::PostBackup => POST_BACKUP,
        }
    }

    /// Its name in Job names, labels and flags.
    pub fn label(self) -> &'static str {
        match self {
            Hook::PreBackup => "pre-backup",
            Hook::PostBackup => "post-backup",
        }
    }

    /// The batch's handler for it.
    pub fn handler(self, hooks: Option<&BackupHooks>) -> Option<&Handler> {
        let hooks = hooks?;
        match self {
            Hook::PreBackup => hooks.pre_backup.as_ref(),
            Hook::PostBackup => hooks.post_backup.as_ref().map(|p| &p.handler),
        }
    }
}

/// Whether `handler` is sent from a Job of the batch's namespace (http and tcp) rather than run by
/// its claimant in the workload's Pods (exec).
pub fn runs_in_job(handler: &Handler) -> bool {
    handler.exec.is_none()
}

/// What runs a claimed hook, as observed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// The controller that claimed it, right after its claim was written (exec hooks).
    Claimant,
    /// The hook's Job (http and tcp hooks).
    Job(JobState),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Missing,
    Active,
    /// It finished or failed; why, in words.
    Ended(String),
}

/// The state of a hook's Job.
pub fn job_state(job: Option<&Job>) -> JobState {
    let Some(job) = job else { return JobState::Missing };
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let ended = conditions.iter().find(|c| c.status == "True" && matches!(c.type_.as_str(), "Complete" | "Failed"));
    match ended {
        None => JobState::Active,
        Some(c) if c.type_ == "Complete" => JobState::Ended("its Pod exited without recording an outcome".into()),
        Some(c) => JobState::Ended(format!(
            "it failed ({}): {}",
            c.reason.as_deref().unwrap_or("no reason"),
            c.message.as_deref().unwrap_or("no message")
        )),
    }
}

/// Where a session's hook stands, read from its condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nobody claimed it: claim it (and act only once the claim is written).
    Claim,
    /// Claimed, and its Job does not exist: create it (its Pod sends the hook at most once).
    CreateJob,
    /// Claimed and possibly running elsewhere: look again at `until`.
    InFlight { until: Timestamp },
    /// It ran; `true` when it succeeded.
    Ran(bool),
    /// Its Job ended before sending it: it certainly did not run; why.
    NotRun(String),
    /// Started long ago and never finished: it may or may not have run, so it is not run again.
    Lost,
}

pub fn step(conditions: &[Condition], hook: Hook, now: Timestamp, runner: &Runner) -> Step {
    let Some(condition) = conditions.iter().find(|c| c.type_ == hook.condition()) else { return Step::Claim };
    let in_flight = |for_how_long: SignedDuration| match now.checked_add(for_how_long) {
        Ok(until) => Step::InFlight { until },
        Err(_) => Step::Lost,
    };
    match (condition.status, runner) {
        (ConditionStatus::True, _) => Step::Ran(true),
        (ConditionStatus::False, _) => Step::Ran(false),
        (ConditionStatus::Unknown, Runner::Claimant) => {
            let claimed = condition.last_transition_time.as_ref().map_or(now, |t| t.0);
            match claimed.checked_add(CLAIM_GRACE) {
                Ok(until) if now < until => Step::InFlight { until },
                _ => Step::Lost,
            }
        }
        (ConditionStatus::Unknown, Runner::Job(state)) => {
            let sending = condition.reason.as_deref() == Some(SENDING);
            match state {
                JobState::Active => in_flight(JOB_POLL),
                JobState::Missing if !sending => Step::CreateJob,
                JobState::Ended(why) if !sending => Step::NotRun(why.clone()),
                // Its Pod began sending, and the Job ended or went without an outcome.
                JobState::Missing | JobState::Ended(_) => Step::Lost,
            }
        }
    }
}

/// The record of a claim on `hook`.
pub fn claim(hook: Hook) -> Desired {
    Desired {
        type_: hook.condition(),
        status: ConditionStatus::Unknown,
        reason: CLAIMED.into(),
        message: "the hook is about to run; it runs at most once".into(),
    }
}

/// Marks a claimed hook as being sent by Pod `pod`, before anything is sent. `false` (and nothing
/// changed) when it is not a claim waiting to be sent: another Pod took it, or it already ran.
pub fn begin_sending(conditions: &mut Vec<Condition>, hook: Hook, pod: &str) -> bool {
    let waiting = conditions.iter().any(|c| {
        c.type_ == hook.condition() && c.status == ConditionStatus::Unknown && c.reason.as_deref() == Some(CLAIMED)
    });
    if waiting {
        let sending = Desired {
            type_: hook.condition(),
            status: ConditionStatus::Unknown,
            reason: SENDING.into(),
            message: format!("Pod {pod} is sending the hook; it is sent at most once"),
        };
        crate::conditions::set(conditions, &sending, None);
    }
    waiting
}

/// The record of a hook's outcome.
pub fn outcome(hook: Hook, result: &Result<(), String>) -> Desired {
    match result {
        Ok(()) => Desired::new(hook.condition(), true, "HookSucceeded", "the hook ran"),
        Err(err) => Desired::new(hook.condition(), false, "HookFailed", err.clone()),
    }
}

/// The record of a hook whose Job ended before sending it.
pub fn not_run(hook: Hook, why: &str) -> Desired {
    Desired::new(hook.condition(), false, "HookNotRun", format!("the hook's Job ended before sending it: {why}"))
}

/// The record of a hook that was started but whose outcome never came.
pub fn lost(hook: Hook) -> Desired {
    Desired::new(
        hook.condition(),
        false,
        "HookOutcomeUnknown",
        "the hook was started but its outcome was never recorded (its runner stopped meanwhile); it is not run twice",
    )
}

/// Where a batch's `exec` hooks run: the live Pods of its workload members, in its own namespace
/// (members of other namespaces are refused before any hook runs), through the API server's exec
/// subresource. `None` where no such Pods exist to run in (a member's own hooks in its sidecar).
pub struct ExecPods {
    pub pods: Api<Pod>,
    /// One label selector per workload member.
    pub selectors: Vec<Selector>,
}

/// Runs an `exec` hook in the batch's workload Pods; `Err` says why it failed, in words fit for a
/// condition message.
pub async fn exec(handler: &Handler, exec_pods: &ExecPods) -> Result<(), String> {
    let command = handler.exec.as_ref().and_then(|e| e.command.as_deref()).unwrap_or_default();
    run_exec(exec_pods, command, handler.container_name.as_deref()).await
}

/// Sends an `httpGet`, `httpPost` or `tcpSocket` hook from this process; `Err` says why it failed.
/// Redirects are answers, not followed (as for a kubelet probe): the answer does not choose where
/// the request goes next.
pub async fn send(handler: &Handler) -> Result<(), String> {
    if handler.exec.is_some() {
        return Err(
            "a member's exec hook is not supported; use the batch's hooks, httpGet, httpPost or tcpSocket".into()
        );
    }
    if let Some(tcp) = &handler.tcp_socket {
        let host = tcp.host.clone().ok_or("tcpSocket hook needs a host")?;
        let port = numeric_port(&tcp.port)?;
        return match tokio::time::timeout(HOOK_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(format!("tcpSocket {host}:{port}: {err}")),
            Err(_) => Err(format!("tcpSocket {host}:{port}: timed out")),
        };
    }
    let client = reqwest::Client::builder()
        .timeout(HOOK_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let request = if let Some(get) = &handler.http_get {
        client
            .get(url(get.scheme, get.host.as_deref(), &get.port, get.path.as_deref())?)
            .headers(headers(&get.http_headers)?)
    } else if let Some(post) = &handler.http_post {
        let mut request = client
            .post(url(post.scheme, post.host.as_deref(), &post.port, post.path.as_deref())?)
            .headers(headers(&post.http_headers)?);
        if let Some(body) = &post.body {
            request = request.body(body.clone());
        } else if !post.form.is_empty() {
            let form: Vec<(String, String)> =
                post.form.iter().flat_map(|f| f.values.iter().map(|v| (f.key.clone(), v.clone()))).collect();
            let encoded: Vec<String> =
                form.iter().map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v))).collect();
            request = request.header("content-type", "application/x-www-form-urlencoded").body(encoded.join("&"));
        }
        request
    } else {
        return Err("the hook names no action".into());
    };
    let response = request.send().await.map_err(|e| format!("hook request failed: {e}"))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() { Ok(()) } else { Err(format!("hook answered HTTP {status}")) }
}

/// How long an exec hook waits for the batch's workload Pods to run its container (a Pod being
/// scheduled, or restarting): half the hook's time, leaving the rest for the command.
const POD_WAIT: Duration = Duration::from_secs(15);
const POD_POLL: Duration = Duration::from_secs(2);
/// How many Pods an exec hook runs in at once.
const EXECS_AT_ONCE: usize = 16;

/// Runs `command` in container `container` (default: each Pod's first container that is not the
/// sidecar) of every live Pod of the batch's workloads, `EXECS_AT_ONCE` at a time; each must exit 0. A Pod that
/// does not run the container yet is waited for, and fails the hook if it still does not: a Pod
/// that starts after the hook would back up without it. All of it ends within `HOOK_TIMEOUT`, which
/// `CLAIM_GRACE` counts on.
async fn run_exec(exec_pods: &ExecPods, command: &[String], container: Option<&str>) -> Result<(), String> {
    if command.is_empty() {
        return Err("the exec hook has no command".into());
    }
    let started = tokio::time::Instant::now();
    let plan = loop {
        let mut pods = Vec::new();
        for selector in &exec_pods.selectors {
            let listed = exec_pods
                .pods
                .list(&ListParams::default().labels_from(selector))
                .await
                .map_err(|e| format!("listing the workload's Pods: {e}"))?;
            pods.extend(listed.items);
        }
        let plan = plan_exec(&pods, container);
        if plan.waiting.is_empty() || started.elapsed() + POD_POLL > POD_WAIT {
            break plan;
        }
        tokio::time::sleep(POD_POLL).await;
    };
    if !plan.waiting.is_empty() {
        return Err(format!(
            "not run: Pod {} of the batch's workloads did not run its container within {}s, and would back up \
             without the hook",
            plan.waiting.join(", "),
            POD_WAIT.as_secs()
        ));
    }
    if plan.ready.is_empty() {
        let which =
            container.map_or_else(|| "no running Pod".to_string(), |c| format!("no running Pod with container {c:?}"));
        return Err(format!("{which} among the batch's workloads to run the exec hook in"));
    }
    // Each run owns what it uses: borrowed, the stream's futures are not provably Send.
    let runs = plan.ready.into_iter().map(|(pod, target)| {
        let (pods, command) = (exec_pods.pods.clone(), command.to_vec());
        async move {
            exec_in(&pods, &pod, &target, &command)
                .await
                .map_err(|err| format!("exec in Pod {pod}, container {target}: {err}"))
        }
    });
    let left = HOOK_TIMEOUT.saturating_sub(started.elapsed());
    // A DaemonSet may have hundreds of Pods: a bounded number of exec streams at once.
    let all = futures::stream::iter(runs).buffer_unordered(EXECS_AT_ONCE).collect::<Vec<_>>();
    match tokio::time::timeout(left, all).await {
        Ok(results) => results.into_iter().collect::<Result<Vec<()>, String>>().map(drop),
        Err(_) => Err(format!("exec in the batch's workload Pods: timed out after {}s", HOOK_TIMEOUT.as_secs())),
    }
}

/// The Pods an exec hook runs in (name and container), and those it waits for (name and why).
#[derive(Debug, Default, PartialEq)]
struct ExecPlan {
    ready: Vec<(String, String)>,
    waiting: Vec<String>,
}

/// Every live Pod (once, however many selectors list it) that has the container: ready when it runs
/// it, else waited for. Terminating and finished Pods back up nothing and are left out.
fn plan_exec(pods: &[Pod], wanted: Option<&str>) -> ExecPlan {
    let mut plan = ExecPlan::default();
    let mut seen = std::collections::BTreeSet::new();
    for pod in pods {
        let name = pod.name_any();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, "Succeeded" | "Failed")
            || !seen.insert(name.clone())
        {
            continue;
        }
        let Some(container) = exec_container(pod, wanted) else { continue };
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
        let running =
            statuses.iter().any(|c| c.name == container && c.state.as_ref().is_some_and(|s| s.running.is_some()));
        match (phase, running) {
            ("Running", true) => plan.ready.push((name, container)),
            ("Running", false) => plan.waiting.push(format!("{name} (container {container} is not running)")),
            (phase, _) => plan.waiting.push(format!("{name} ({phase})")),
        }
    }
    plan
}

/// The container an exec hook runs in: the named one, or the first that is not the sidecar.
fn exec_container(pod: &Pod, wanted: Option<&str>) -> Option<String> {
    let containers = &pod.spec.as_ref()?.containers;
    match wanted {
        Some(name) => containers.iter().find(|c| c.name == name),
        None => containers.iter().find(|c| c.name != SIDECAR_NAME),
    }
    .map(|c| c.name.clone())
}

async fn exec_in(pods: &Api<Pod>, pod: &str, container: &str, command: &[String]) -> Result<(), String> {
    let params = AttachParams::default().container(container).stdin(false).stdout(true).stderr(true);
    let mut process = pods.exec(pod, command.iter().map(String::as_str), &params).await.map_err(|e| e.to_string())?;
    let mut stderr = process.stderr();
    let mut stdout = process.stdout();
    let status = process.take_status();
    // Drain both streams so the command never blocks on a full pipe; keep the end of stderr to say why.
    let (err, _) = tokio::join!(tail(stderr.as_mut()), tail(stdout.as_mut()));
    let status = match status {
        Some(status) => status.await,
        None => None,
    };
    process.join().await.map_err(|e| e.to_string())?;
    match status {
        Some(s) if s.status.as_deref() == Some("Success") => Ok(()),
        Some(s) => {
            let message = s.message.unwrap_or_else(|| "the command failed".into());
            Err(if err.is_empty() { message } else { format!("{message}: {err}") })
        }
        None => Err("the API server did not report the command's exit status".into()),
    }
}

/// The bytes of a hook's output kept to say why it failed.
const TAIL_BYTES: usize = 300;

/// The last [`TAIL_BYTES`] a stream printed, as text. The rest is dropped as it comes: a hook runs
/// inside the operator, and one that prints gigabytes must not take the operator's memory.
async fn tail(stream: Option<&mut (impl tokio::io::AsyncRead + Unpin)>) -> String {
    use tokio::io::AsyncReadExt;
    let Some(stream) = stream else { return String::new() };
    let mut kept = Vec::with_capacity(2 * TAIL_BYTES);
    let mut chunk = [0u8; 8192];
    while let Ok(read @ 1..) = stream.read(&mut chunk).await {
        kept.extend_from_slice(&chunk[read.saturating_sub(TAIL_BYTES)..read]);
        kept.drain(..kept.len().saturating_sub(TAIL_BYTES));
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

/// Whether a post-backup hook runs for a session that `succeeded`, with `retries_left`.
pub fn post_hook_applies(policy: HookExecutionPolicy, succeeded: bool, retries_left: bool) -> bool {
    match policy {
        HookExecutionPolicy::Always => true,
        HookExecutionPolicy::OnSuccess => succeeded,
        HookExecutionPolicy::OnFailure => !succeeded,
        HookExecutionPolicy::OnFinalRetryFailure => !succeeded && !retries_left,
    }
}

fn numeric_port(port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
        IntOrString::String(name) => {
            name.parse().map_err(|_| format!("named port {name:?} needs a Pod to resolve; give a number"))
        }
    }
}

fn url(
    scheme: Option<UriScheme>,
    host: Option<&str>,
    port: &IntOrString,
    path: Option<&str>,
) -> Result<String, String> {
    let host = host.ok_or("HTTP hooks need a host (resolving a Pod's IP is not supported yet)")?;
    let scheme = if scheme == Some(UriScheme::Https) { "https" } else { "http" };
    let path = path.unwrap_or("/");
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Ok(format!("{scheme}://{host}:{}{path}", numeric_port(port)?))
}

fn headers(headers: &[k8s_openapi::api::core::v1::HTTPHeader]) -> Result<reqwest::header::HeaderMap, String> {
    let mut map = reqwest::header::HeaderMap::new();
    for header in headers {
        let name = reqwest::header::HeaderName::from_bytes(header.name.as_bytes()).map_err(|e| e.to_string())?;
        let value = reqwest::header::HeaderValue::from_str(&header.value).map_err(|e| e.to_string())?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The peak resident memory of this process (VmHWM), in bytes.
    fn peak_memory() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
        line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("a number of kB") * 1024
    }

    /// A hook that prints a gigabyte costs the operator no more memory than the end it keeps.
    #[tokio::test]
    async fn a_hook_that_prints_a_lot_keeps_only_the_end() {
        use tokio::io::AsyncReadExt;
        let before = peak_memory();
        let mut output = tokio::io::repeat(b'x').take(1 << 30).chain(&b" the end"[..]);
        let kept = tail(Some(&mut output)).await;
        assert_eq!(kept.len(), TAIL_BYTES);
        assert!(kept.ends_with("x the end"), "{kept}");
        let grown = peak_memory().saturating_sub(before);
        assert!(grown < 256 << 20, "reading the output took {} MiB", grown >> 20);
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    /// A Pod of the workloads, in `phase`, whose containers `app` and the sidecar run or not.
    fn pod(name: &str, phase: &str, app_running: bool, terminating: bool) -> Pod {
        let state = |running: bool| {
            if running { json!({"running": {}}) } else { json!({"waiting": {"reason": "CrashLoopBackOff"}}) }
        };
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "app"}, {"name": SIDECAR_NAME}]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "app", "ready": app_running, "restartCount": 0, "image": "", "imageID": "", "state": state(app_running)},
                {"name": SIDECAR_NAME, "ready": true, "restartCount": 0, "image": "", "imageID": "", "state": state(true)}]}
        }))
        .expect("a Pod");
        if terminating {
            pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(1)));
        }
        pod
    }

    /// A Pod that is scheduled, starting or restarting is waited for, not passed over: it would back
    /// up without the hook. Terminating and finished Pods, and Pods without the container, are not.
    #[test]
    fn an_exec_hook_waits_for_every_live_pod_that_would_back_up() {
        let running = pod("web-1", "Running", true, false);
        let plan = plan_exec(
            &[
                running.clone(),
                pod("web-2", "Pending", false, false),
                pod("web-3", "Running", false, false),
                pod("web-4", "Running", true, true),
                pod("web-5", "Succeeded", false, false),
                running.clone(),
            ],
            Some("app"),
        );
        assert_eq!(plan.ready, [("web-1".to_string(), "app".to_string())], "once, though listed twice");
        assert_eq!(plan.waiting, ["web-2 (Pending)", "web-3 (container app is not running)"]);
        assert_eq!(
            plan_exec(std::slice::from_ref(&running), Some("db")),
            ExecPlan::default(),
            "no such container: not ours"
        );
        let default = plan_exec(&[running], None);
        assert_eq!(default.ready, [("web-1".to_string(), "app".to_string())], "the first container not the sidecar");
    }

    #[test]
    fn an_exec_hook_is_claimed_once_and_never_rerun() {
        use crate::conditions::set;
        let claimant = Runner::Claimant;
        let mut conditions = Vec::new();
        assert_eq!(step(&conditions, Hook::PreBackup, at(1_000_000), &claimant), Step::Claim);
        set(&mut conditions, &claim(Hook::PreBackup), None);
        let claimed = conditions[0].last_transition_time.as_ref().expect("time").0;
        let now = step(&conditions, Hook::PreBackup, claimed, &claimant);
        assert!(matches!(now, Step::InFlight { .. }), "claimed: someone runs it");
        let later = claimed.checked_add(SignedDuration::from_secs(46)).expect("time");
        assert_eq!(step(&conditions, Hook::PreBackup, later, &claimant), Step::Lost, "no outcome: not rerun");
        set(&mut conditions, &outcome(Hook::PreBackup, &Err("down".into())), None);
        assert_eq!(step(&conditions, Hook::PreBackup, later, &claimant), Step::Ran(false));
        assert_eq!(step(&conditions, Hook::PostBackup, later, &claimant), Step::Claim, "hooks are tracked apart");
    }

    #[test]
    fn a_sent_hook_follows_its_job_and_its_pod_marks_it_before_sending() {
        use crate::conditions::set;
        let job = |state: JobState| Runner::Job(state);
        let ended = || JobState::Ended("DeadlineExceeded".into());
        let now = at(1_000_000);
        let mut conditions = Vec::new();
        assert_eq!(step(&conditions, Hook::PostBackup, now, &job(JobState::Missing)), Step::Claim);
        set(&mut conditions, &claim(Hook::PostBackup), None);
        assert_eq!(step(&conditions, Hook::PostBackup, now, &job(JobState::Missing)), Step::CreateJob);
        assert!(matches!(step(&conditions, Hook::PostBackup, now, &job(JobState::Active)), Step::InFlight { .. }));
        assert_eq!(
            step(&conditions, Hook::PostBackup, now, &job(ended())),
            Step::NotRun("DeadlineExceeded".into()),
            "a Job that ended before its Pod took the hook certainly did not send it"
        );
        // However late (a Pod that waited long to start), the claim stays the Job's to send.
        let much_later = now.checked_add(SignedDuration::from_hours(2)).expect("time");
        assert!(matches!(
            step(&conditions, Hook::PostBackup, much_later, &job(JobState::Active)),
            Step::InFlight { .. }
        ));

        assert!(!begin_sending(&mut conditions, Hook::PreBackup, "p"), "only a claimed hook is taken");
        assert!(begin_sending(&mut conditions, Hook::PostBackup, "p"), "the first Pod takes it");
        assert!(!begin_sending(&mut conditions, Hook::PostBackup, "q"), "a second Pod sends nothing");
        assert!(matches!(step(&conditions, Hook::PostBackup, now, &job(JobState::Active)), Step::InFlight { .. }));
        assert_eq!(step(&conditions, Hook::PostBackup, now, &job(ended())), Step::Lost, "it may have been sent");
        assert_eq!(step(&conditions, Hook::PostBackup, now, &job(JobState::Missing)), Step::Lost, "never re-created");
        set(&mut conditions, &outcome(Hook::PostBackup, &Ok(())), None);
        assert_eq!(step(&conditions, Hook::PostBackup, now, &job(ended())), Step::Ran(true));
        assert!(!begin_sending(&mut conditions, Hook::PostBackup, "r"), "a decided hook is never sent again");
    }

    #[test]
    fn post_hook_policies() {
        use HookExecutionPolicy::*;
        assert!(post_hook_applies(Always, false, true));
        assert!(post_hook_applies(OnSuccess, true, false) && !post_hook_applies(OnSuccess, false, false));
        assert!(post_hook_applies(OnFailure, false, true) && !post_hook_applies(OnFailure, true, false));
        assert!(post_hook_applies(OnFinalRetryFailure, false, false));
        assert!(!post_hook_applies(OnFinalRetryFailure, false, true));
    }

    /// A hook's target may answer with a redirect; following it would let the answer pick where
    /// the request goes next. The redirect counts as an answer (as for a kubelet probe).
    #[tokio::test]
    async fn an_http_hook_does_not_follow_redirects() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let followed = Arc::new(AtomicUsize::new(0));
        let counted = followed.clone();
        let app = axum::Router::new()
            .route("/freeze", axum::routing::get(|| async { axum::response::Redirect::temporary("/elsewhere") }))
            .route(
                "/elsewhere",
                axum::routing::get(move || async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    "ok"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let handler: Handler = serde_json::from_value(serde_json::json!(
            {"httpGet": {"host": "127.0.0.1", "port": port, "path": "/freeze"}}
        ))
        .expect("a handler");
        assert_eq!(send(&handler).await, Ok(()), "a redirect is an answer");
        assert_eq!(followed.load(Ordering::SeqCst), 0, "the redirect was not followed");
    }

    #[test]
    fn form_values_are_url_encoded() {
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
