//! Global hooks of a session: run at most once before the first and after the last member.
//!
//! At most once, whatever runs them (a conflict retry, a stale cache, a leader change, a second
//! operator on the cluster): a controller first records its claim on the hook in the session's
//! status — a write guarded by resourceVersion, so only one claim can land — and runs the hook only
//! after that write succeeded. [`step`] reads where a hook stands from that record.

use crate::api::common::{Condition, ConditionStatus, Handler, HookExecutionPolicy, UriScheme};
use crate::conditions::Desired;
use crate::executor_pod::SIDECAR_NAME;
use crate::restic::backend::percent_encode;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, AttachParams, ListParams};
use kube::core::Selector;
use std::time::Duration;

const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a claim its holder may still be running the hook: the hook's own timeout plus the
/// time to write the outcome. Past that, the claimant is gone and the outcome is unknown.
const CLAIM_GRACE: SignedDuration = SignedDuration::from_secs(45);

pub const PRE_BACKUP: &str = "PreBackupHookExecutionSucceeded";
pub const POST_BACKUP: &str = "PostBackupHookExecutionSucceeded";
const CLAIMED: &str = "HookClaimed";

/// Where a session's hook stands, read from its condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nobody claimed it: claim it (and run it only once the claim is written).
    Claim,
    /// Claimed and possibly running elsewhere: look again at `until`.
    InFlight { until: Timestamp },
    /// It ran; `true` when it succeeded.
    Ran(bool),
    /// Claimed long ago and never finished: it may or may not have run, so it is not run again.
    Lost,
}

pub fn step(conditions: &[Condition], hook: &str, now: Timestamp) -> Step {
    let Some(condition) = conditions.iter().find(|c| c.type_ == hook) else { return Step::Claim };
    match condition.status {
        ConditionStatus::True => Step::Ran(true),
        ConditionStatus::False => Step::Ran(false),
        ConditionStatus::Unknown => {
            let claimed = condition.last_transition_time.as_ref().map_or(now, |t| t.0);
            match claimed.checked_add(CLAIM_GRACE) {
                Ok(until) if now < until => Step::InFlight { until },
                _ => Step::Lost,
            }
        }
    }
}

/// The record of a claim on `hook`.
pub fn claim(hook: &'static str) -> Desired {
    Desired {
        type_: hook,
        status: ConditionStatus::Unknown,
        reason: CLAIMED.into(),
        message: "the hook is running; it runs at most once".into(),
    }
}

/// The record of a hook's outcome.
pub fn outcome(hook: &'static str, result: &Result<(), String>) -> Desired {
    match result {
        Ok(()) => Desired::new(hook, true, "HookSucceeded", "the hook ran"),
        Err(err) => Desired::new(hook, false, "HookFailed", err.clone()),
    }
}

/// The record of a claim whose outcome never came.
pub fn lost(hook: &'static str) -> Desired {
    Desired::new(
        hook,
        false,
        "HookOutcomeUnknown",
        "the hook was started but its outcome was never recorded (the operator stopped meanwhile); it is not run twice",
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

/// Runs `handler`; `Err` says why it failed, in words fit for a condition message.
pub async fn run(handler: &Handler, exec_pods: Option<&ExecPods>) -> Result<(), String> {
    if let Some(exec) = &handler.exec {
        let Some(exec_pods) = exec_pods else {
            return Err(
                "a member's exec hook is not supported; use the batch's hooks, httpGet, httpPost or tcpSocket".into()
            );
        };
        let command = exec.command.as_deref().unwrap_or_default();
        return run_exec(exec_pods, command, handler.container_name.as_deref()).await;
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
    let client = reqwest::Client::builder().timeout(HOOK_TIMEOUT).build().map_err(|e| e.to_string())?;
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
    if response.status().is_success() { Ok(()) } else { Err(format!("hook answered HTTP {}", response.status())) }
}

/// Runs `command` in container `container` (default: each Pod's first container that is not the
/// sidecar) of every live Pod of the batch's workloads; each must exit 0.
async fn run_exec(exec_pods: &ExecPods, command: &[String], container: Option<&str>) -> Result<(), String> {
    if command.is_empty() {
        return Err("the exec hook has no command".into());
    }
    let mut ran = 0;
    for selector in &exec_pods.selectors {
        let listed = exec_pods
            .pods
            .list(&ListParams::default().labels_from(selector))
            .await
            .map_err(|e| format!("listing the workload's Pods: {e}"))?;
        for pod in listed.items.iter().filter(|p| is_running(p)) {
            let Some(target) = exec_container(pod, container) else { continue };
            let name = pod.name_any();
            match tokio::time::timeout(HOOK_TIMEOUT, exec_in(&exec_pods.pods, &name, &target, command)).await {
                Ok(Ok(())) => ran += 1,
                Ok(Err(err)) => return Err(format!("exec in Pod {name}, container {target}: {err}")),
                Err(_) => return Err(format!("exec in Pod {name}, container {target}: timed out")),
            }
        }
    }
    if ran == 0 {
        let which =
            container.map_or_else(|| "no running Pod".to_string(), |c| format!("no running Pod with container {c:?}"));
        return Err(format!("{which} among the batch's workloads to run the exec hook in"));
    }
    Ok(())
}

fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
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

/// The last 300 bytes a stream printed, as text.
async fn tail(stream: Option<&mut (impl tokio::io::AsyncRead + Unpin)>) -> String {
    use tokio::io::AsyncReadExt;
    let Some(stream) = stream else { return String::new() };
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all).await;
    let start = all.len().saturating_sub(300);
    String::from_utf8_lossy(&all[start..]).trim().to_string()
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

    #[test]
    fn a_hook_is_claimed_once_and_never_rerun() {
        use crate::conditions::set;
        let now = Timestamp::from_second(1_000_000).expect("time");
        let mut conditions = Vec::new();
        assert_eq!(step(&conditions, PRE_BACKUP, now), Step::Claim);
        set(&mut conditions, &claim(PRE_BACKUP), None);
        let claimed = conditions[0].last_transition_time.as_ref().expect("time").0;
        assert!(matches!(step(&conditions, PRE_BACKUP, claimed), Step::InFlight { .. }), "claimed: someone runs it");
        let later = claimed.checked_add(SignedDuration::from_secs(46)).expect("time");
        assert_eq!(step(&conditions, PRE_BACKUP, later), Step::Lost, "a claim with no outcome is not rerun");
        set(&mut conditions, &outcome(PRE_BACKUP, &Err("down".into())), None);
        assert_eq!(step(&conditions, PRE_BACKUP, later), Step::Ran(false));
        assert_eq!(step(&conditions, POST_BACKUP, later), Step::Claim, "hooks are tracked apart");
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

    #[test]
    fn form_values_are_url_encoded() {
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
