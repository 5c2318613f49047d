//! `kubectl stash` end to end: the real kubectl runs the built `kubectl-stash` from PATH as a user
//! with nothing but Kubernetes' own `edit` role in the namespace; the repository commands' Jobs run
//! as local processes of the real binary (no kubelet, see `support::executors`) against a real restic
//! repository, and the RestoreBatch a restore creates is carried out by the operator.

mod support;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use serde_json::{Value, json};
use stash::api::backup_session::BackupSessionPhase;
use stash::api::restore_batch::RestorePhase;
use stash::plugin::repository_job::TASK_LABEL;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::TestNamespace;
use support::backends;
use support::data::{BATCH, Backend, Setup, Volumes};
use support::executors::{KilledOnDrop, service_account_kubeconfig};
use support::fixtures::{self, PASSWORD};
use support::kubectl_stash;

/// The namespace user `kubectl stash` runs as.
const USER: &str = "developer";
/// A hang guard for a command and the Jobs it waits for.
const COMMAND_LIMIT: Duration = Duration::from_secs(180);

/// The ClusterRoles Kubernetes aggregates into `edit`, ours (deploy/base/rbac.yaml) among them. The
/// test control plane runs without the aggregation controller, so `edit` itself is empty there and
/// the user is bound to what it would hold.
const EDIT: [&str; 3] = ["system:aggregate-to-edit", "system:aggregate-to-view", "stash-edit"];

/// A kubeconfig for ServiceAccount `developer` of `ns`, with the namespace's `edit` role.
async fn namespace_editor(ns: &TestNamespace, dir: &Path) -> PathBuf {
    fixtures::create::<ServiceAccount>(ns, json!({"metadata": {"name": USER}})).await;
    for role in EDIT {
        fixtures::create::<RoleBinding>(
            ns,
            json!({"metadata": {"name": format!("{USER}-{}", role.replace(':', "-"))},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                   "subjects": [{"kind": "ServiceAccount", "name": USER, "namespace": ns.name}]}),
        )
        .await;
    }
    service_account_kubeconfig(&ns.name, USER, dir).await
}

/// Runs `kubectl stash <args>` to its end while playing kubelet for the Jobs it creates.
async fn run_plugin(setup: &mut Setup, kubeconfig: &Path, args: &[&str]) -> Output {
    let mut child =
        kubectl_stash(kubeconfig, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("kubectl runs");
    let start = Instant::now();
    let root = setup.node.root().to_path_buf();
    while child.try_wait().expect("the plugin's status").is_none() {
        for (job, output) in setup.node.run_new_jobs_matching(TASK_LABEL, &root).await {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!stderr.contains(PASSWORD), "a secret leaked into the output of {job}");
            eprintln!("Job {job}: {} {}", output.status, stderr.trim());
        }
        if start.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            panic!("kubectl stash {args:?} did not finish");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = child.wait_with_output().expect("the plugin's output");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD), "a secret in the plugin's output");
    eprintln!("kubectl stash {args:?}: {}\n{stdout}{stderr}", output.status);
    output
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// No Job and no result ConfigMap of the plugin is left behind after a command that succeeded.
async fn nothing_left(setup: &Setup) {
    let jobs = setup.ns.api::<Job>().list(&kube::api::ListParams::default().labels(TASK_LABEL)).await.expect("Jobs");
    assert!(jobs.items.is_empty(), "{:?}", jobs.items.iter().map(kube::ResourceExt::name_any).collect::<Vec<_>>());
    let results = setup.ns.api::<ConfigMap>().list(&Default::default()).await.expect("ConfigMaps").items;
    let ours: Vec<_> = results.iter().map(kube::ResourceExt::name_any).filter(|n| n.starts_with(BATCH)).collect();
    assert!(ours.is_empty(), "{ours:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_editor_describes_lists_checks_and_restores_through_kubectl_stash() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("plugin", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    let session = setup.back_up().await;
    let session_name = kube::ResourceExt::name_any(&session);
    assert_eq!(session.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));
    let identities = tempfile::tempdir().expect("kubeconfig dir");
    let user = namespace_editor(&setup.ns, identities.path()).await;

    // describe: one screen, and the objects as JSON.
    let text = succeeded(&run_plugin(&mut setup, &user, &["describe", BATCH]).await);
    assert!(text.contains(&format!("{}/{BATCH}", setup.ns.name)) && text.contains(&session_name), "{text}");
    let described: Value =
        serde_json::from_str(&succeeded(&run_plugin(&mut setup, &user, &["describe", BATCH, "-o", "json"]).await))
            .expect("describe -o json parses");
    assert_eq!(described["sessions"][0]["metadata"]["name"], json!(session_name));
    assert_eq!(described["repository"]["metadata"]["name"], json!("repo"));

    // logs: the session's executor Pods, found by its label (with no kubelet they have no log yet).
    let logs = succeeded(&run_plugin(&mut setup, &user, &["logs", &session_name]).await);
    assert!(logs.contains(&format!("==> pod/{session_name}-0-")), "the backup Job's Pod: {logs}");
    assert!(logs.contains(&format!("==> pod/{session_name}-finalize-")), "the finalize Job's Pod: {logs}");

    // snapshots: the session's snapshot, complete, from a Job in the cluster; as a table and as JSON.
    let table = succeeded(&run_plugin(&mut setup, &user, &["snapshots", BATCH]).await);
    assert!(table.contains(&session_name) && table.contains("uploads"), "{table}");
    let listed: Value =
        serde_json::from_str(&succeeded(&run_plugin(&mut setup, &user, &["snapshots", BATCH, "-o", "json"]).await))
            .expect("snapshots -o json parses");
    let snapshots = listed["snapshots"].as_array().expect("a list");
    assert_eq!(snapshots.len(), 1, "{listed}");
    let snapshot = &snapshots[0];
    assert_eq!(
        (&snapshot["session"], &snapshot["host"], &snapshot["complete"]),
        (&json!(session_name), &json!("uploads"), &json!(true))
    );
    assert!(snapshot["sizeBytes"].as_u64().is_some_and(|b| b > 300_000), "{snapshot}");
    assert!(snapshot["paths"].to_string().contains("stash-data/uploads"), "{snapshot}");

    // check: restic check in the cluster.
    let checked = succeeded(&run_plugin(&mut setup, &user, &["check", BATCH]).await);
    assert!(checked.contains("no errors found"), "{checked}");
    nothing_left(&setup).await;

    // restore: a RestoreBatch the operator accepts and runs to Succeeded; the data comes back.
    let created = succeeded(
        &run_plugin(&mut setup, &user, &["restore", BATCH, "--session", &session_name, "--name", "back"]).await,
    );
    assert!(created.contains("restorebatch/back created"), "{created}");
    let restored = tempfile::tempdir().expect("restore dir");
    let restore = setup.run_restore("back", Volumes::Root(restored.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    for file in ["index.html", "2026/11/invoice.pdf"] {
        let original = std::fs::read(setup.node.root().join("stash-data/uploads").join(file)).expect("original");
        let back = std::fs::read(restored.path().join("stash-data/uploads").join(file)).expect("restored");
        assert!(original == back, "{file} differs after the restore");
    }

    // Another namespace may not use the Repository (usagePolicy `Same`): refused, nothing created.
    let refused = run_plugin(&mut setup, &user, &["restore", BATCH, "--to-namespace", "elsewhere"]).await;
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{message}");
    assert!(message.contains("--to-namespace elsewhere") && message.contains("usagePolicy"), "{message}");
}

/// The lock a `restic backup --stdin` takes: held while `stdin` stays open.
fn restic_holding_a_lock(setup: &Setup, repo: &str) -> (KilledOnDrop, std::process::ChildStdin) {
    let mut child = Command::new(backends::restic())
        .args(["-r", repo, "backup", "--stdin", "--stdin-filename", "held.bin"])
        .envs(setup.secret.iter())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restic starts");
    let stdin = child.stdin.take().expect("restic's stdin");
    (KilledOnDrop(child), stdin)
}

fn lock_ids(setup: &Setup, repo: &str) -> Vec<String> {
    setup.restic(&["-r", repo, "list", "locks", "--no-lock"]).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn unlock_removes_a_stale_lock_and_keeps_a_live_one() {
    let repo = tempfile::tempdir().expect("repo dir");
    let repo_arg = repo.path().to_string_lossy().into_owned();
    unlock_keeps_the_live_lock(Setup::new("plugin-unlock", Backend::Local(repo.path())).await, &repo_arg).await;
}

/// On S3 only `restic unlock` removes a lock: it runs when a listing made right before it holds no
/// lock restic would remove that is not proven stale.
#[tokio::test(flavor = "multi_thread")]
async fn unlock_on_s3_removes_a_stale_lock_through_restic_and_keeps_a_live_one() {
    let server = backends::s3_server();
    let repo_arg = format!("s3:http://127.0.0.1:{}/stash/plugin-unlock-s3", server.port);
    unlock_keeps_the_live_lock(Setup::new("plugin-unlock-s3", Backend::S3(server.port)).await, &repo_arg).await;
}

/// A restic killed while it held its lock and one that still holds its own, in `repo_arg`; `kubectl
/// stash unlock` removes the first only.
async fn unlock_keeps_the_live_lock(mut setup: Setup, repo_arg: &str) {
    let repo_arg = repo_arg.to_string();
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    setup.restic(&["-r", &repo_arg, "init"]);
    // A restic killed while it held its lock (its process is gone), and one that still holds its own.
    let (mut killed, _killed_stdin) = restic_holding_a_lock(&setup, &repo_arg);
    support::eventually("the first lock", Duration::from_secs(30), || async {
        (lock_ids(&setup, &repo_arg).len() == 1).then_some(())
    })
    .await;
    let stale = lock_ids(&setup, &repo_arg).remove(0);
    killed.0.kill().expect("kill");
    let _ = killed.0.wait();
    let (_live, _live_stdin) = restic_holding_a_lock(&setup, &repo_arg);
    let live = support::eventually("the second lock", Duration::from_secs(30), || async {
        lock_ids(&setup, &repo_arg).into_iter().find(|id| *id != stale)
    })
    .await;
    let identities = tempfile::tempdir().expect("kubeconfig dir");
    let user = namespace_editor(&setup.ns, identities.path()).await;

    let output = run_plugin(&mut setup, &user, &["unlock", BATCH, "-o", "json"]).await;
    let report: Value = serde_json::from_str(&succeeded(&output)).expect("unlock -o json parses");
    let verdict = |id: &str| {
        let locks = report["locks"].as_array().cloned().unwrap_or_default();
        locks.into_iter().find(|l| l["id"] == json!(id)).unwrap_or_else(|| panic!("no verdict on {id}: {report}"))
    };
    assert_eq!(verdict(&stale)["removed"], json!(true), "{report}");
    assert!(verdict(&stale)["reason"].as_str().is_some_and(|r| r.contains("process is gone")), "{report}");
    assert_eq!(verdict(&live)["removed"], json!(false), "{report}");
    assert_eq!(lock_ids(&setup, &repo_arg), vec![live], "only the live lock is left");
    nothing_left(&setup).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_named_and_never_a_panic() {
    let ns = TestNamespace::new("plugin-input").await;
    let identities = tempfile::tempdir().expect("kubeconfig dir");
    let user = namespace_editor(&ns, identities.path()).await;
    let cases: [(&[&str], &str); 5] = [
        (&["describe", "nope"], "nope"),
        (&["snapshots", "nope"], "BackupBatch"),
        (&["restore", "nope"], "BackupBatch"),
        (&["restore", BATCH, "--before", "yesterday"], "--before"),
        (&["logs", "nope-1"], "BackupSession"),
    ];
    for (args, named) in cases {
        let output = kubectl_stash(&user, args).output().expect("kubectl runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
