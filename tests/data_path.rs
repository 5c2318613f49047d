//! The data path end to end: the operator (in-process) schedules, the executors (the real `stash`
//! binary as local processes: no kubelet yet) back up with the real restic into real backends on
//! loopback, finalize the session in the repository, and restore it byte for byte.

mod support;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use stash::api::backup_session::{BackupSessionPhase, HostPhase};
use stash::api::common::ConditionStatus;
use stash::api::restore_batch::RestorePhase;
use stash::api::{BackupBatch, BackupSession, Repository};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::backends::{self, PG_PASSWORD, psql};
use support::data::{BATCH, Backend, Setup, Volumes};
use support::executors::write_secret_dir;
use support::fixtures;

/// ~2,000 files: nested directories, empty files, symlinks, a 50 MB file, odd names.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root).expect("root");
    for d in 0..40 {
        let dir = root.join(format!("dir-{d:02}/sub"));
        std::fs::create_dir_all(&dir).expect("dir");
        for f in 0..49 {
            let body: Vec<u8> = (0..(f * 97 + d)).map(|i| (i * 31 + d * 7 + f) as u8).collect();
            std::fs::write(dir.join(format!("file-{f:02}.txt")), body).expect("file");
        }
    }
    for name in ["empty", "with space.txt", "ünïcödé-名前.txt", "quote'and\"dq", "-leading-dash", "tab\tname"] {
        std::fs::write(root.join(name), name.as_bytes()).expect("odd file");
    }
    std::fs::write(root.join("dir-00/empty-too"), b"").expect("empty");
    std::os::unix::fs::symlink("dir-01/sub/file-03.txt", root.join("link-to-file")).expect("symlink");
    std::os::unix::fs::symlink("../nowhere", root.join("dangling-link")).expect("symlink");
    std::os::unix::fs::symlink("dir-02", root.join("link-to-dir")).expect("symlink");
    let big: Vec<u8> = (0..50 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(root.join("big.bin"), big).expect("big file");
    std::fs::set_permissions(root.join("empty"), std::fs::Permissions::from_mode(0o600)).expect("mode");
}

/// Every entry of a tree: path → (kind, content or link target, mode).
fn tree_listing(root: &Path) -> BTreeMap<String, (char, Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, Vec<u8>, u32)>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let relative = path.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("link").to_string_lossy().into_owned();
                out.insert(relative, ('l', target.into_bytes(), 0));
            } else if meta.is_dir() {
                out.insert(relative, ('d', Vec::new(), mode));
                walk(root, &path, out);
            } else {
                out.insert(relative, ('f', std::fs::read(&path).expect("read"), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same_tree(original: &Path, restored: &Path) {
    let (a, b) = (tree_listing(original), tree_listing(restored));
    assert_eq!(a.len(), b.len(), "entry counts differ: {} vs {}", a.len(), b.len());
    for (path, entry) in &a {
        assert!(b.get(path) == Some(entry), "{path} differs after restore");
    }
}

fn table_checksum(port: u16) -> String {
    psql(port, "shop", "SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM items t")
}

fn seed_database(port: u16) {
    psql(port, "postgres", "CREATE DATABASE shop");
    psql(
        port,
        "shop",
        "CREATE TABLE items (id serial PRIMARY KEY, name text, qty int, note text); \
         INSERT INTO items (name, qty, note) SELECT 'item ' || g, g % 17, repeat('x', g % 50) FROM generate_series(1, 5000) g",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_a_pvc_and_postgres_back_up_and_restore_identically_without_kubelet() {
    let pg = backends::postgres();
    seed_database(pg.port);
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("datapath", Backend::Local(repo.path())).await;
    fixtures::targets(&setup.ns).await;
    let app_data = setup.node.root().join("var/lib/app/data");
    make_tree(&app_data);
    let members = vec![
        json!({"target": {"alias": "app", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
               "paths": ["/var/lib/app/data"]}}),
        setup.pvc_member().await,
        setup.database_member(pg.port).await,
    ];
    setup.batch(members, json!({"timeOut": "10m"})).await;
    let _sidecar = setup.node.spawn_sidecar(BATCH, "Deployment", "app", "app-5d8f7c9b4-abcde");

    let session = setup.back_up().await;
    let status = session.status.clone().expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:?}");
    for target in &status.targets {
        let host = &target.stats[0];
        assert_eq!(host.phase, Some(HostPhase::Succeeded), "{host:?}");
        assert!(!host.snapshots[0].name.is_empty(), "a snapshot id");
    }
    let app_stats = status.targets[0].stats[0].snapshots[0].file_stats.clone().expect("file stats");
    assert!(app_stats.total_files.unwrap_or(0) >= 1960, "{app_stats:?}");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "ManifestWritten" && c.status == stash::api::common::ConditionStatus::True)
    );

    let repo_url = repo.path().to_string_lossy().into_owned();
    let listed: Vec<Value> =
        serde_json::from_str(&setup.restic(&["-r", &repo_url, "snapshots", "--json", "--no-lock"])).expect("JSON");
    let session_tag = format!("session={}", kube::ResourceExt::name_any(&session));
    for member in ["app", "uploads", "shop-db"] {
        let found = listed.iter().any(|s| {
            let tags: Vec<&str> = s["tags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            s["hostname"] == member
                && tags.contains(&session_tag.as_str())
                && tags.contains(&format!("batch={BATCH}").as_str())
                && tags.contains(&format!("member={member}").as_str())
        });
        assert!(found, "restic lists no tagged snapshot of {member}: {listed:?}");
    }
    let repository = setup.ns.api::<stash::api::Repository>().get("repo").await.expect("repository");
    let repo_status = repository.status.expect("repository status");
    assert_eq!(repo_status.snapshot_count, Some(3));
    assert_eq!(repo_status.integrity, Some(true));
    assert!(repo_status.last_backup_time.is_some());

    let before = table_checksum(pg.port);
    psql(pg.port, "shop", "DELETE FROM items WHERE id % 3 = 0; UPDATE items SET qty = -1");
    assert_ne!(table_checksum(pg.port), before);
    // The app's data lives in a claim of its pod template: the restore writes there.
    let volume = json!({"spec": {"template": {"spec": {"volumes": [{"name": "app-data", "persistentVolumeClaim": {"claimName": "app-data"}}]}}}});
    let deployments = setup.ns.api::<k8s_openapi::api::apps::v1::Deployment>();
    deployments.patch("app", &Default::default(), &kube::api::Patch::Merge(&volume)).await.expect("patch");
    let restored = tempfile::tempdir().expect("restore dir");
    let restore = setup
        .restore(
            "restore-all",
            vec![
                json!({"target": {"alias": "app", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
                       "volumeMounts": [{"name": "app-data", "mountPath": "/var/lib/app/data"}]}}),
                json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"}}}),
                json!({"target": {"alias": "shop-db", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "pg-conn"}},
                       "task": {"name": "postgres-restore-15"}}),
            ],
            json!({}),
            restored.path(),
        )
        .await;
    assert_same_tree(&app_data, &restored.path().join("var/lib/app/data"));
    assert_same_tree(&setup.node.root().join("stash-data/uploads"), &restored.path().join("stash-data/uploads"));
    assert_eq!(table_checksum(pg.port), before, "the database is back as it was");
    let restore_status = restore.status.expect("restore status");
    assert_eq!(restore_status.restored_session.as_deref(), Some(kube::ResourceExt::name_any(&session).as_str()));
    assert_eq!(restore_status.members.len(), 3);
}

/// A running session's status shows each host's live progress (and `kubectl get` sums it up); a host
/// whose backend stops taking data is reported as stalled, and recovers when it takes data again.
/// 1 GiB that does not deduplicate goes to a REST server behind a throttle a little at a time.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_backup_shows_its_progress_and_a_stalled_backend_is_reported() {
    let server = backends::rest_server();
    let throttle = support::throttle::Throttle::start(server.port, 24 << 20).await;
    let mut setup = Setup::with_stall_after("progress", Backend::Rest(throttle.port), Duration::from_secs(4)).await;
    let member = setup.pvc_member().await;
    write_random_files(&setup.node.root().join("stash-data/uploads/large"), 16, 64 << 20);
    setup.batch(vec![member], json!({})).await;
    let client = support::client().await;
    let session = stash::session::create_backup_session(client, &setup.ns.name, BATCH, None).await.expect("session");
    let name = kube::ResourceExt::name_any(&session);
    let sessions = setup.ns.api::<BackupSession>();

    // The backup Job runs on its own (a kubelet would) while the test watches its session.
    let mut node = setup.node;
    let runner = tokio::spawn(async move {
        let limit = Instant::now() + Duration::from_secs(120);
        while node.run_new_jobs().await.is_empty() {
            assert!(Instant::now() < limit, "no backup Job appeared");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        node
    });
    let moving = support::eventually("progress in the session's status", Duration::from_secs(180), || {
        let sessions = sessions.clone();
        let name = name.clone();
        async move {
            let status = sessions.get(&name).await.ok()?.status?;
            let host = status.targets.first()?.progress.first()?.clone();
            (host.bytes_done > 0 && host.percent < 100).then_some((host, status.progress?))
        }
    })
    .await;
    let (host, summary) = moving;
    println!("progress seen: {host:?}, summary {summary}");
    assert_eq!(host.hostname, "uploads");
    assert!(host.total_bytes >= 1 << 30, "the whole tree is counted: {host:?}");
    assert!(summary.contains('%') && summary.contains("GiB"), "{summary}");
    let table = support::node::kubectl(&["get", "backupsession", "-n", &setup.ns.name, &name]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("PROGRESS") && table.contains('%'), "a printer column: {table}");

    // The backend stops taking data: restic's numbers stop moving, and the operator says so.
    throttle.set_rate(0);
    let stalled = fixtures::session_condition(&sessions, &name, "Stalled").await;
    let message = stalled.message.unwrap_or_default();
    assert!(message.contains("PersistentVolumeClaim/uploads host uploads: no progress since"), "{message}");
    let events = setup.ns.api::<k8s_openapi::api::events::v1::Event>();
    let warned = events.list(&Default::default()).await.expect("events").items;
    assert!(warned.iter().any(|e| e.reason.as_deref() == Some("BackupStalled")), "a BackupStalled Event");

    // It takes data again: the session moves on, finishes, and keeps no live progress.
    throttle.set_rate(u64::MAX);
    setup.node = runner.await.expect("the Job runner");
    let done = setup.back_up_existing(&name).await;
    let status = done.status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:?}");
    let recovered = status.conditions.iter().find(|c| c.type_ == "Stalled").expect("the condition stays, False");
    assert_eq!(recovered.status, ConditionStatus::False);
    assert_eq!(status.progress, None);
    assert!(status.targets.iter().all(|t| t.progress.is_empty()), "{:?}", status.targets);
}

/// `count` files of `size` bytes that neither compress nor deduplicate.
fn write_random_files(dir: &Path, count: usize, size: u64) {
    std::fs::create_dir_all(dir).expect("dir");
    for index in 0..count {
        let mut random = std::io::Read::take(std::fs::File::open("/dev/urandom").expect("urandom"), size);
        let mut file = std::fs::File::create(dir.join(format!("part-{index}"))).expect("file");
        std::io::copy(&mut random, &mut file).expect("random bytes");
    }
}

/// Backs up the PVC member and restores it, through `backend`.
async fn pvc_round_trip(prefix: &str, backend: Backend<'_>) {
    let mut setup = Setup::new(prefix, backend).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    let session = setup.back_up().await;
    let status = session.status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:?}");
    let restored = tempfile::tempdir().expect("restore dir");
    let pvc = json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"}}});
    setup.restore("restore-uploads", vec![pvc], json!({}), restored.path()).await;
    assert_same_tree(&setup.node.root().join("stash-data/uploads"), &restored.path().join("stash-data/uploads"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rest_server_backend_round_trips() {
    let server = backends::rest_server();
    pvc_round_trip("rest", Backend::Rest(server.port)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_backend_round_trips() {
    let server = backends::s3_server();
    pvc_round_trip("s3", Backend::S3(server.port)).await;
}

fn uploaded_bytes(session: &BackupSession, target: usize) -> String {
    let status = session.status.as_ref().expect("status");
    status.targets[target].stats[0].snapshots[0].uploaded.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_complete_sets_and_restore_skips_an_incomplete_run() {
    let pg = backends::postgres();
    seed_database(pg.port);
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("retention", Backend::Local(repo.path())).await;
    let members = vec![setup.pvc_member().await, setup.database_member(pg.port).await];
    let retention = json!({"retentionPolicy": {"name": "last", "keepLast": 1, "prune": true}, "backupHistoryLimit": 3});
    setup.batch(members, retention).await;
    let uploads = setup.node.root().join("stash-data/uploads");
    std::fs::write(uploads.join("large.bin"), vec![42u8; 4_000_000]).expect("file");

    let first = setup.back_up().await;
    assert_eq!(first.status.as_ref().and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));
    // The second run after a small change uploads only that change.
    std::fs::write(uploads.join("index.html"), "<h1>changed</h1>").expect("file");
    tokio::time::sleep(Duration::from_secs(1)).await; // session names are per second
    let second = setup.back_up().await;
    assert_eq!(second.status.as_ref().and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));
    let stats = second.status.as_ref().expect("status").targets[0].stats[0].snapshots[0].clone();
    let files = stats.file_stats.clone().expect("file stats");
    assert_eq!((files.new_files, files.modified_files), (Some(0), Some(1)), "{files:?}");
    assert!(uploaded_bytes(&second, 0).ends_with(" B") || uploaded_bytes(&second, 0).contains("KiB"), "{stats:?}");
    assert!(uploaded_bytes(&first, 0).contains("MiB"), "the first run uploaded the data");

    let repo_url = repo.path().to_string_lossy().into_owned();
    let snapshots = |setup: &Setup| -> Vec<Value> {
        serde_json::from_str(&setup.restic(&["-r", &repo_url, "snapshots", "--json", "--no-lock"])).expect("JSON")
    };
    let second_name = kube::ResourceExt::name_any(&second);
    let sessions_left: std::collections::BTreeSet<String> = snapshots(&setup)
        .iter()
        .flat_map(|s| s["tags"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().and_then(|t| t.strip_prefix("session=")).map(str::to_string))
        .collect();
    assert_eq!(sessions_left, [second_name.clone()].into(), "keepLast 1 leaves one complete set");
    assert_eq!(snapshots(&setup).len(), 3, "two members and the manifest");
    // The Repository counts what retention left: the second set's two members.
    let repository = setup.ns.api::<stash::api::Repository>().get("repo").await.expect("repository");
    let counted = repository.status.unwrap_or_default();
    assert_eq!((counted.snapshot_count, counted.snapshots_removed_on_last_cleanup), (Some(2), Some(3)));
    let args: Vec<String> = ["sessions", BATCH, "--from-repository", "-n", &setup.ns.name].map(String::from).into();
    let listed = setup.node.command(&args, "cli").output().expect("stash sessions runs");
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success() && table.contains(&second_name), "{table}");
    assert!(!table.contains(&kube::ResourceExt::name_any(&first)), "the first set was forgotten: {table}");
    // On a workstation (no POD_NAMESPACE, no -n) the kubeconfig's current namespace counts, as for kubectl.
    let workstation = tempfile::tempdir().expect("dir");
    let kubeconfig = workstation.path().join("config");
    std::fs::copy(&setup.node.kubeconfig, &kubeconfig).expect("a kubeconfig");
    let context = Command::new(support::kubectl_path())
        .args(["config", "set-context", "--current", "--namespace", &setup.ns.name, "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .expect("kubectl runs");
    assert!(context.status.success(), "{}", String::from_utf8_lossy(&context.stderr));
    let args: Vec<String> = ["sessions", BATCH, "--from-repository"].map(String::from).into();
    let mut command = setup.node.command(&args, "cli");
    let listed = command.env_remove("POD_NAMESPACE").env("KUBECONFIG", &kubeconfig).output().expect("stash runs");
    let table = String::from_utf8_lossy(&listed.stdout);
    let problem = String::from_utf8_lossy(&listed.stderr);
    assert!(listed.status.success() && table.contains(&second_name), "{table}{problem}");

    // A third run whose database is down: Failed, no manifest, and restore still takes the second.
    write_secret_dir(
        setup.node.database_secret_dir.path(),
        &BTreeMap::from([
            ("host".to_string(), "127.0.0.1".to_string()),
            ("port".to_string(), backends::free_port().to_string()),
            ("username".to_string(), "postgres".to_string()),
            ("password".to_string(), PG_PASSWORD.to_string()),
            ("database".to_string(), "shop".to_string()),
        ]),
    );
    std::fs::write(uploads.join("index.html"), "<h1>third</h1>").expect("file");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let third = setup.back_up().await;
    let status = third.status.clone().expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Failed));
    let db_error = status.targets[1].stats[0].error.clone().unwrap_or_default();
    assert!(db_error.contains("dump of shop.sql failed") && db_error.contains("127.0.0.1"), "{db_error}");
    assert!(!db_error.contains(PG_PASSWORD));
    let manifest = status.conditions.iter().find(|c| c.type_ == "ManifestWritten").expect("manifest condition");
    assert_eq!(manifest.status, stash::api::common::ConditionStatus::False);

    let restored = tempfile::tempdir().expect("restore dir");
    let pvc = json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"}}});
    let restore = setup.restore("restore-latest", vec![pvc], json!({}), restored.path()).await;
    let page = std::fs::read_to_string(restored.path().join("stash-data/uploads/index.html")).expect("restored");
    assert_eq!(page, "<h1>changed</h1>", "the last complete set is the second run");
    assert_eq!(restore.status.and_then(|s| s.restored_session), Some(second_name));
}

/// One failing backup: the session fails, the target says why without secrets, and the repository
/// keeps what it had.
async fn failing_backup(setup: &mut Setup, expect: &str) {
    let session = setup.back_up().await;
    let status = session.status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Failed), "{status:?}");
    let error = status.targets[0].stats[0].error.clone().unwrap_or_default();
    assert!(error.contains(expect), "{error:?} should say {expect:?}");
    for secret in setup.secret.values() {
        assert!(!error.contains(secret.as_str()), "a secret in {error:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_passwords_unreachable_backends_and_missing_paths_fail_clearly() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("failures", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    let good = setup.back_up().await;
    assert_eq!(good.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));
    let repo_url = repo.path().to_string_lossy().into_owned();
    let before = setup.restic(&["-r", &repo_url, "snapshots", "--json", "--no-lock"]);

    let mut wrong = setup.secret.clone();
    wrong.insert("RESTIC_PASSWORD".into(), "wrong-password-1234".into());
    write_secret_dir(setup.node.secret_dir.path(), &wrong);
    tokio::time::sleep(Duration::from_secs(1)).await;
    failing_backup(&mut setup, "wrong RESTIC_PASSWORD").await;
    write_secret_dir(setup.node.secret_dir.path(), &setup.secret);

    std::fs::remove_dir_all(setup.node.root().join("stash-data/uploads")).expect("remove");
    tokio::time::sleep(Duration::from_secs(1)).await;
    failing_backup(&mut setup, "path /stash-data/uploads does not exist").await;
    assert_eq!(setup.restic(&["-r", &repo_url, "snapshots", "--json", "--no-lock"]), before, "snapshots untouched");

    let repositories = setup.ns.api::<stash::api::Repository>();
    let patch = json!({"spec": {"backend": {"local": null, "rest": {"url": format!("http://127.0.0.1:{}/", backends::free_port())}}}});
    repositories
        .patch("repo", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect("patch");
    tokio::time::sleep(Duration::from_secs(1)).await;
    failing_backup(&mut setup, "unreachable").await;
}

/// Lock files of a local repository; a `-tmp-` file is one restic is still writing, not a lock.
fn lock_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).filter(|e| !e.file_name().to_string_lossy().contains("-tmp-")).count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_left_by_a_killed_executor_is_healed_by_the_next_session() {
    use std::os::unix::process::CommandExt;
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("stale-lock", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    let big: Vec<u8> = (0..120 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 13) as u8).collect();
    std::fs::write(setup.node.root().join("stash-data/uploads/big.bin"), big).expect("big file");
    setup.batch(vec![member], json!({"timeOut": "15s"})).await;

    // Session one: its backup Job is killed (SIGKILL to its process group) while restic holds a lock.
    let client = support::client().await;
    let first = stash::session::create_backup_session(client, &setup.ns.name, BATCH, None).await.expect("session");
    let jobs = setup.ns.api::<k8s_openapi::api::batch::v1::Job>();
    let job = support::eventually("the backup Job", Duration::from_secs(60), || {
        let jobs = jobs.clone();
        async move {
            jobs.list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|j| kube::ResourceExt::name_any(j).ends_with("-0"))
        }
    })
    .await;
    let job_name = kube::ResourceExt::name_any(&job);
    let args =
        job.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].args.clone().unwrap_or_default()).expect("args");
    let mut child = setup.node.command(&args, "killed-x7k2p").process_group(0).spawn().expect("backup-job starts");
    let locks = repo.path().join("locks");
    let start = Instant::now();
    while lock_files(&locks) == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "restic never took a lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pgid = i32::try_from(child.id()).expect("pid");
    assert!(Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status().expect("kill").success());
    let _ = child.wait();
    assert_eq!(lock_files(&locks), 1, "the killed restic left its lock");
    let sessions = setup.ns.api::<BackupSession>();
    let failed =
        fixtures::session_phase(&sessions, &kube::ResourceExt::name_any(&first), BackupSessionPhase::Failed).await;
    let status = failed.status.expect("status");
    // The Job's activeDeadlineSeconds (the session's deadline) ends it: the operator sees it died,
    // or the session's own deadline, which is the same instant, fails it first.
    let died = status.targets[0].stats.first().and_then(|s| s.error.as_deref()).unwrap_or_default();
    let timed_out = status.conditions.iter().any(|c| c.type_ == "DeadlineExceeded");
    assert!(died.contains("failed before reporting") || timed_out, "{status:?}");
    setup.node.mark_run(&job_name);

    // The next executor proves the lock stale (its process is gone), removes it with an Event, and
    // the next session succeeds.
    let next = setup.back_up().await;
    assert_eq!(next.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));
    assert_eq!(lock_files(&locks), 0, "no lock left");
    let note = stale_lock_removed(&setup).await;
    assert!(note.contains("its process is gone"), "{note}");
}

/// A backup on a network repository runs at once, without listing locks first; an exclusive lock
/// left by a killed restic (a `check` cut off mid-way) stops it, and only then is the lock proven
/// stale (its process is gone), removed with an Event, and the backup run again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_exclusive_lock_on_a_rest_repository_is_healed_when_it_stops_a_backup() {
    let server = backends::rest_server();
    let throttle = support::throttle::Throttle::start(server.port, u64::MAX).await;
    let mut setup = Setup::new("rest-lock", Backend::Rest(throttle.port)).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({"timeOut": "2m"})).await;
    let first = setup.back_up().await;
    assert_eq!(first.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));

    // Slowed to a trickle, `restic check` is caught holding its exclusive lock, then stopped and killed.
    let direct = format!("rest:http://127.0.0.1:{}/rest-lock", server.port);
    let throttled = format!("rest:http://127.0.0.1:{}/rest-lock", throttle.port);
    throttle.set_rate(2048);
    let mut check = Command::new(backends::restic())
        .args(["-r", &throttled, "check"])
        .envs(setup.secret.iter())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("restic check starts");
    let start = Instant::now();
    while setup.restic(&["-r", &direct, "list", "locks", "--no-lock"]).trim().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "restic check never took its lock");
    }
    throttle.set_rate(0);
    check.kill().expect("kill restic check");
    let _ = check.wait();
    throttle.set_rate(u64::MAX);
    assert_eq!(setup.restic(&["-r", &direct, "list", "locks", "--no-lock"]).lines().count(), 1, "the lock stays");

    let next = setup.back_up().await;
    assert_eq!(next.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));
    assert_eq!(setup.restic(&["-r", &direct, "list", "locks", "--no-lock"]).trim(), "", "no lock left");
    let note = stale_lock_removed(&setup).await;
    assert!(note.contains("exclusive lock") && note.contains("its process is gone"), "{note}");
}

/// The note of the namespace's StaleLockRemoved Event.
async fn stale_lock_removed(setup: &Setup) -> String {
    let events = setup.ns.api::<k8s_openapi::api::events::v1::Event>();
    let healed = events.list(&Default::default()).await.expect("events").items;
    healed
        .iter()
        .find(|e| e.reason.as_deref() == Some("StaleLockRemoved"))
        .and_then(|e| e.note.clone())
        .expect("a StaleLockRemoved Event")
}

/// Files of the PVC member that make this namespace's data recognisable.
fn mark_uploads(setup: &Setup, text: &str) {
    std::fs::write(setup.node.root().join("stash-data/uploads/index.html"), text).expect("file");
}

/// The manifest snapshots of the repository, as restic lists them.
fn manifests(setup: &Setup, repo: &Path) -> Vec<Value> {
    let url = repo.to_string_lossy().into_owned();
    let listed: Vec<Value> = serde_json::from_str(&setup.restic(&[
        "-r",
        &url,
        "snapshots",
        "--json",
        "--no-lock",
        "--tag",
        "stash=manifest",
    ]))
    .expect("JSON");
    listed
}

impl Setup {
    /// Creates a session and runs its backup Jobs (not its finalize Job) until it is final.
    async fn back_up_without_finalize(&mut self) -> String {
        let client = support::client().await;
        let session = stash::session::create_backup_session(client, &self.ns.name, BATCH, None).await.expect("session");
        let name = kube::ResourceExt::name_any(&session);
        self.run_until_final(&name).await;
        name
    }

    /// Runs the backup Jobs of `name` (not its finalize Job) until the session is final.
    async fn run_until_final(&mut self, name: &str) {
        let sessions = self.ns.api::<BackupSession>();
        let start = Instant::now();
        loop {
            let finalize = format!("{name}-finalize");
            self.node.mark_run(&finalize);
            for (job, output) in self.node.run_new_jobs().await {
                eprintln!("job {job}: {} {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
            }
            let status = sessions.get(name).await.expect("session").status.unwrap_or_default();
            if status.phase.is_some_and(|p| p.is_final()) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "session {name} stuck: {status:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Runs the finalize Job of `session` now, as a kubelet would.
    async fn finalize(&mut self, session: &str) {
        self.finalize_with(session, &backends::restic()).await;
    }

    /// The same, with `restic` as the Job's restic binary.
    async fn finalize_with(&mut self, session: &str, restic: &Path) {
        let jobs = self.ns.api::<k8s_openapi::api::batch::v1::Job>();
        let name = format!("{session}-finalize");
        let job = support::eventually(&format!("Job {name}"), Duration::from_secs(60), || {
            let (jobs, name) = (jobs.clone(), name.clone());
            async move { jobs.get_opt(&name).await.ok().flatten() }
        })
        .await;
        let args = job.spec.and_then(|s| s.template.spec).and_then(|p| p.containers[0].args.clone()).expect("args");
        let mut command = self.node.command(&args, &format!("{name}-x7k2p"));
        let output = command.env("STASH_RESTIC_BINARY", restic).output().expect("stash runs");
        eprintln!("job {name}: {} {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
}

fn uploads_member() -> Value {
    json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"}}})
}

/// C1: a session that fails before any member runs (its pre-backup hook is down) is not a set, and
/// retention with `keepLast: 1` keeps the previous complete one, which still restores.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_failed_in_its_pre_backup_hook_leaves_the_last_complete_set_restorable() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("prehook", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({"retentionPolicy": {"name": "last", "keepLast": 1, "prune": true}})).await;
    mark_uploads(&setup, "<h1>complete</h1>");
    let good = setup.back_up().await;
    assert_eq!(good.status.as_ref().and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));

    let hook = json!({"spec": {"hooks": {"preBackup": {"tcpSocket": {"host": "127.0.0.1", "port": 1}}}}});
    setup
        .ns
        .api::<BackupBatch>()
        .patch(BATCH, &Default::default(), &kube::api::Patch::Merge(&hook))
        .await
        .expect("patch");
    mark_uploads(&setup, "<h1>changed after the good run</h1>");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = setup.back_up().await;
    let status = failed.status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Failed), "{status:?}");
    let manifest = status.conditions.iter().find(|c| c.type_ == "ManifestWritten").expect("manifest condition");
    assert_eq!(manifest.status, stash::api::common::ConditionStatus::False, "{manifest:?}");
    assert_eq!(manifests(&setup, repo.path()).len(), 1, "only the complete session has a manifest");

    let expected = ("<h1>complete</h1>".to_string(), Some(kube::ResourceExt::name_any(&good)));
    assert_eq!(restored_page(&mut setup, "after-failed-hook").await, expected);
}

/// C2: finalize Jobs that run out of order (the older session's last) never forget the newer
/// complete set; "newest" is by session start.
#[tokio::test(flavor = "multi_thread")]
async fn finalize_jobs_out_of_order_keep_the_newest_complete_set() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("order", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    let spec = json!({"retentionPolicy": {"name": "last", "keepLast": 1, "prune": true}, "backupHistoryLimit": 5});
    setup.batch(vec![member], spec).await;
    mark_uploads(&setup, "<h1>first</h1>");
    let first = setup.back_up_without_finalize().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mark_uploads(&setup, "<h1>second</h1>");
    let second = setup.back_up_without_finalize().await;
    setup.finalize(&first).await;
    setup.finalize(&second).await;

    assert_eq!(restored_page(&mut setup, "latest").await, ("<h1>second</h1>".into(), Some(second)));

    // And the other order: the older session finalized last does not push the newer one out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    mark_uploads(&setup, "<h1>third</h1>");
    let third = setup.back_up_without_finalize().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mark_uploads(&setup, "<h1>fourth</h1>");
    let fourth = setup.back_up_without_finalize().await;
    setup.finalize(&fourth).await;
    setup.finalize(&third).await;
    assert_eq!(restored_page(&mut setup, "latest-again").await, ("<h1>fourth</h1>".into(), Some(fourth)));
}

/// A restic that, at its first call after the finalize's keep rules ran (`forget --dry-run`),
/// plays a cron slot firing at that moment: a new session of the batch starts and one of its
/// members backs up. The session's name is written to `dir/late`.
fn restic_with_a_late_session(dir: &Path, setup: &Setup) -> PathBuf {
    let (restic, stash) = (backends::restic(), env!("CARGO_BIN_EXE_stash"));
    let (admin, ns) = (setup.node.kubeconfig.display(), &setup.ns.name);
    std::fs::write(dir.join("data"), "late").expect("file");
    let script = format!(
        r#"#!/bin/bash
set -euo pipefail
dir={dir}
# The forget after the dry run starts the late session before it deletes anything. Not any run after
# the dry run: a size measure runs beside the forget, and a backup there could meet forget's
# exclusive lock, fail, and leave the finalize to start over past the late session.
if [[ -f $dir/after-dry-run && " $* " == *" forget "* && " $* " != *" --dry-run "* ]] && mkdir $dir/late-claimed 2>/dev/null; then
  created=$(KUBECONFIG={admin} {stash} create-backupsession --invoker-name {BATCH} --namespace {ns})
  name=${{created#backupsession/}}; name=${{name% created}}
  {restic} backup --quiet --host late --tag "session=$name,batch={BATCH},namespace={ns}" $dir/data >&2
  printf %s "$name" > $dir/late
fi
if [[ " $* " == *" forget "* && " $* " == *" --dry-run "* ]]; then touch $dir/after-dry-run; fi
exec {restic} "$@"
"#,
        dir = dir.display(),
        restic = restic.display(),
    );
    restic_wrapper(dir, &script)
}

/// A `restic` in `dir` that runs restic and logs each run to the file returned, as `start <args>`
/// and `end <args>` lines in the order they happened.
fn logging_restic(dir: &Path) -> (PathBuf, PathBuf) {
    let calls = dir.join("calls");
    let script = format!(
        "#!/bin/sh\necho \"start $*\" >> '{calls}'\n'{restic}' \"$@\"\nrc=$?\necho \"end $*\" >> '{calls}'\nexit $rc\n",
        calls = calls.display(),
        restic = backends::restic().display()
    );
    (restic_wrapper(dir, &script), calls)
}

/// Writes `script` as an executable `restic` in `dir`, for the executors to run instead of restic.
fn restic_wrapper(dir: &Path, script: &str) -> PathBuf {
    let path = dir.join("restic");
    std::fs::write(&path, script).expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// R1: a session that starts while a finalize applies retention — after the finalize read which
/// sessions are unsettled, before it lists the snapshots — keeps the snapshots it wrote: retention
/// forgets only snapshots it listed before it read the unsettled sessions.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_started_while_retention_runs_keeps_its_snapshots() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("late", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    let spec = json!({"retentionPolicy": {"name": "last", "keepLast": 1}, "backupHistoryLimit": 5});
    setup.batch(vec![member], spec).await;
    mark_uploads(&setup, "<h1>first</h1>");
    setup.back_up().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = setup.back_up_without_finalize().await;
    // Session names count seconds: the late one must not take the second's name.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let scratch = tempfile::tempdir().expect("scratch dir");
    let restic = restic_with_a_late_session(scratch.path(), &setup);
    setup.finalize_with(&second, &restic).await;

    let late = std::fs::read_to_string(scratch.path().join("late")).expect("the late session started");
    let url = repo.path().to_string_lossy().into_owned();
    let tag = format!("session={late}");
    let listed: Vec<Value> =
        serde_json::from_str(&setup.restic(&["-r", &url, "snapshots", "--json", "--no-lock", "--tag", &tag]))
            .expect("JSON");
    assert_eq!(listed.len(), 1, "the late session's snapshot is still in the repository");
    let finalized = setup.ns.api::<BackupSession>().get(&second).await.expect("session");
    let retention =
        finalized.status.unwrap_or_default().conditions.into_iter().find(|c| c.type_ == "RetentionPolicyApplied");
    assert!(retention.is_some_and(|c| c.status == ConditionStatus::True), "retention ran");
}

/// A policy of `keepTags` alone, which keeps no manifest here, keeps the newest complete session and
/// forgets the others (restic itself refuses a rule that keeps nothing of a group); and a forgotten
/// session loses its manifest in a forget that ends before the forget of its data starts, so a
/// finalize cut short never leaves a manifest whose data is gone.
#[tokio::test(flavor = "multi_thread")]
async fn retention_by_tags_alone_forgets_a_sessions_manifest_before_its_data() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("tagged", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    let spec = json!({"retentionPolicy": {"name": "pinned", "keepTags": ["pinned"]}, "backupHistoryLimit": 5});
    setup.batch(vec![member], spec).await;
    let retained = async |setup: &Setup, session: &str| {
        let status = setup.ns.api::<BackupSession>().get(session).await.expect("session").status.unwrap_or_default();
        let applied = status.conditions.iter().find(|c| c.type_ == "RetentionPolicyApplied");
        assert!(applied.is_some_and(|c| c.status == ConditionStatus::True), "{session}: {:?}", status.conditions);
    };
    let first = setup.back_up_without_finalize().await;
    setup.finalize(&first).await;
    retained(&setup, &first).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = setup.back_up_without_finalize().await;
    let url = repo.path().to_string_lossy().into_owned();
    let of_first = |setup: &Setup| -> Vec<Value> {
        let tag = format!("session={first}");
        serde_json::from_str(&setup.restic(&["-r", &url, "snapshots", "--json", "--no-lock", "--tag", &tag]))
            .expect("JSON")
    };
    let is_manifest = |s: &Value| s["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == "stash=manifest"));
    let (manifest, data): (Vec<Value>, Vec<Value>) = of_first(&setup).into_iter().partition(is_manifest);
    let id = |s: &[Value]| s.first().and_then(|s| s["id"].as_str()).expect("a snapshot").to_string();
    let (manifest, data) = (id(&manifest), id(&data));

    let scratch = tempfile::tempdir().expect("scratch dir");
    let (restic, calls) = logging_restic(scratch.path());
    setup.finalize_with(&second, &restic).await;
    retained(&setup, &second).await;
    let left = manifests(&setup, repo.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0]["tags"].as_array().is_some_and(|t| t.contains(&json!(format!("session={second}")))), "{left:?}");
    assert!(of_first(&setup).is_empty(), "the older session is forgotten");
    let log = std::fs::read_to_string(&calls).expect("restic ran");
    let at = |event: &str, id: &str| {
        log.lines()
            .position(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.first() == Some(&event) && words.contains(&"forget") && words.contains(&id)
            })
            .unwrap_or_else(|| panic!("no {event} of a forget of {id}:\n{log}"))
    };
    assert!(at("end", &manifest) < at("start", &data), "the manifest went first:\n{log}");
}

/// Restores the PVC member from the latest complete session: its index page and the session.
async fn restored_page(setup: &mut Setup, name: &str) -> (String, Option<String>) {
    let restored = tempfile::tempdir().expect("restore dir");
    let restore = setup.restore(name, vec![uploads_member()], json!({}), restored.path()).await;
    let page = std::fs::read_to_string(restored.path().join("stash-data/uploads/index.html")).expect("restored");
    (page, restore.status.and_then(|s| s.restored_session))
}

/// H1: `backupHistoryLimit: 0` keeps no session in the API, but each one is finalized first: the
/// manifest is written and retention runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_zero_history_limit_still_writes_the_manifest() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("nohistory", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({"backupHistoryLimit": 0})).await;
    let client = support::client().await;
    let session = stash::session::create_backup_session(client, &setup.ns.name, BATCH, None).await.expect("session");
    let name = kube::ResourceExt::name_any(&session);
    let sessions = setup.ns.api::<BackupSession>();
    let start = Instant::now();
    while sessions.get_opt(&name).await.expect("get").is_some() {
        setup.node.run_new_jobs().await;
        assert!(start.elapsed() < Duration::from_secs(120), "session {name} never went away");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let written = manifests(&setup, repo.path());
    let sessions_of: Vec<&str> =
        written.iter().filter_map(|m| m["tags"].as_array()).flatten().filter_map(Value::as_str).collect();
    assert!(sessions_of.contains(&format!("session={name}").as_str()), "no manifest for {name}: {written:?}");
}

/// M11: restic's cache lives in the executor's scratch volume (`/tmp`, which for a sidecar lasts as
/// long as its Pod), so a workload's next session reuses the indexes instead of downloading them
/// again; `tempDir.disableCaching` runs restic without one.
#[tokio::test(flavor = "multi_thread")]
async fn restics_cache_stays_in_the_scratch_volume_unless_disabled() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("cache", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member.clone()], json!({})).await;
    let cache = setup.node.root().join("tmp/restic-cache");
    setup.back_up().await;
    let kept = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert!(kept > 0, "restic's cache was kept in the scratch volume ({})", cache.display());

    std::fs::remove_dir_all(&cache).expect("clear the cache");
    let mut uncached = member;
    uncached["tempDir"] = json!({"disableCaching": true});
    let patch = json!({"spec": {"members": [uncached]}});
    setup
        .ns
        .api::<BackupBatch>()
        .patch(BATCH, &Default::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect("patch");
    tokio::time::sleep(Duration::from_secs(1)).await;
    setup.back_up().await;
    let left = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "disableCaching: restic ran without a cache");
}

/// `restic check` takes the repository to itself: it runs on a finalize only when the last one is
/// older than the Repository's check interval (default 24 h), or failed; otherwise the session says
/// when it last passed. `0s` checks on every finalize.
#[tokio::test(flavor = "multi_thread")]
async fn the_integrity_check_runs_once_per_interval_not_on_every_finalize() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("checks", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    let verified = |session: &BackupSession| {
        let status = session.status.clone().unwrap_or_default();
        let found = status.conditions.into_iter().find(|c| c.type_ == "RepositoryIntegrityVerified");
        found.map(|c| (c.status, c.reason.unwrap_or_default()))
    };
    let passed = Some((stash::api::common::ConditionStatus::True, "CheckPassed".to_string()));
    assert_eq!(verified(&setup.back_up().await), passed, "the first finalize checks");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recently = Some((stash::api::common::ConditionStatus::True, "CheckedRecently".to_string()));
    assert_eq!(verified(&setup.back_up().await), recently, "the next one within the interval does not");

    let every = json!({"metadata": {"annotations": {"stash.appscode.com/check-interval": "0s"}}});
    let repositories = setup.ns.api::<stash::api::Repository>();
    repositories.patch("repo", &Default::default(), &kube::api::Patch::Merge(&every)).await.expect("annotate");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(verified(&setup.back_up().await), passed, "an interval of 0s checks every time");
}

/// A finalize measures the Repository's size beside its forget, over the snapshots retention
/// leaves, instead of after it over everything (one repository opening fewer in sequence), and the
/// size is what restic measures of the repository once the finalize is done. Its runs that only
/// read take no restic lock.
#[tokio::test(flavor = "multi_thread")]
async fn a_finalize_measures_beside_its_forget_and_locks_only_to_write() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("sized", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({"retentionPolicy": {"name": "last", "keepLast": 1}})).await;
    mark_uploads(&setup, "<h1>first</h1>");
    setup.back_up().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mark_uploads(&setup, "<h1>second, and longer than the first</h1>");
    let second = setup.back_up_without_finalize().await;

    let scratch = tempfile::tempdir().expect("scratch dir");
    let (restic, calls) = logging_restic(scratch.path());
    setup.finalize_with(&second, &restic).await;
    let ran = std::fs::read_to_string(&calls).unwrap_or_default();
    let at = |edge: &str, command: &str| {
        ran.lines()
            .position(|l| l.starts_with(edge) && l.split_whitespace().any(|w| w == command) && !l.contains("--dry-run"))
            .unwrap_or_else(|| panic!("no {edge} {command} in {ran}"))
    };
    assert!(at("start", "stats") < at("end", "forget"), "the size is measured beside the forget: {ran}");
    // restic's lock costs each run that takes it 200 ms of settling: a finalize holds the
    // maintenance Lease, and only its writes need restic's lock against restic clients outside stash.
    let reading = ["snapshots", "stats", "ls", "dump", "cat", "list"];
    let locked_reads: Vec<&str> = ran
        .lines()
        .filter_map(|l| l.strip_prefix("start "))
        .filter(|l| l.contains("--dry-run") || l.split_whitespace().any(|w| reading.contains(&w)))
        .filter(|l| !l.split_whitespace().any(|w| w == "--no-lock"))
        .collect();
    assert!(locked_reads.is_empty(), "runs that only read took restic's lock: {locked_reads:?}");

    let url = repo.path().to_string_lossy().into_owned();
    let measured: Value =
        serde_json::from_str(&setup.restic(&["-r", &url, "stats", "--json", "--no-lock", "--mode", "raw-data"]))
            .expect("JSON");
    let measured = measured["total_size"].as_u64().expect("a size");
    let repository = setup.ns.api::<stash::api::Repository>().get("repo").await.expect("repository");
    let status = repository.status.expect("status");
    assert_eq!(status.total_size.as_deref(), Some(stash::api::backup_session::human_bytes(measured).as_str()));
    assert_eq!(status.snapshots_removed_on_last_cleanup, Some(2), "the first session's two snapshots went");
}

/// H2: same-named batches of two namespaces share one repository; each keeps and restores its own data.
#[tokio::test(flavor = "multi_thread")]
async fn same_named_batches_of_two_namespaces_restore_their_own_data() {
    let repo = tempfile::tempdir().expect("repo dir");
    let retention = json!({"retentionPolicy": {"name": "last", "keepLast": 1, "prune": true}});
    let mut prod = Setup::new("prod", Backend::Local(repo.path())).await;
    let member = prod.pvc_member().await;
    prod.batch(vec![member], retention.clone()).await;
    mark_uploads(&prod, "<h1>prod</h1>");
    let mut staging = Setup::new("staging", Backend::Local(repo.path())).await;
    let member = staging.pvc_member().await;
    staging.batch(vec![member], retention).await;
    mark_uploads(&staging, "<h1>staging</h1>");

    let prod_session = prod.back_up().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    staging.back_up().await;

    let expected = ("<h1>prod</h1>".to_string(), Some(kube::ResourceExt::name_any(&prod_session)));
    assert_eq!(restored_page(&mut prod, "own-data").await, expected, "prod restores prod's data");
}

/// RELIABILITY-SECURITY C3: namespace `platform`'s Repository allows `tenant` (usagePolicy). Both
/// namespaces' executors, each under its own namespace's ServiceAccount, back up into it, finalize
/// under its one Lease and restore their own data. Once `platform` stops allowing it, the tenant's
/// executor account can no longer even read the Repository.
#[tokio::test(flavor = "multi_thread")]
async fn a_repository_another_namespace_allows_serves_it_under_its_own_accounts_until_revoked() {
    let repo = tempfile::tempdir().expect("repo dir");
    let retention = json!({"retentionPolicy": {"name": "last", "keepLast": 1, "prune": true}});
    let mut platform = Setup::new("platform", Backend::Local(repo.path())).await;
    let mut tenant = Setup::new("tenant", Backend::Local(repo.path())).await;
    let shared: Api<Repository> = platform.ns.api();
    let allow = |from: &str| json!({"spec": {"usagePolicy": {"allowedNamespaces": {"from": from}}}});
    shared.patch("repo", &PatchParams::default(), &Patch::Merge(allow("All"))).await.expect("shared");
    tenant.repository = json!({"name": "repo", "namespace": platform.ns.name});
    for (setup, page) in [(&platform, "<h1>platform</h1>"), (&tenant, "<h1>tenant</h1>")] {
        let member = setup.pvc_member().await;
        setup.batch(vec![member], retention.clone()).await;
        mark_uploads(setup, page);
    }

    let tenant_session = tenant.back_up().await;
    let status = tenant_session.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "the tenant's session: {status:?}");
    let written = status.conditions.iter().find(|c| c.type_ == "ManifestWritten").map(|c| c.status);
    assert_eq!(written, Some(ConditionStatus::True), "the tenant's set is complete: {status:?}");
    let lease = platform.ns.api::<Lease>().get("stash-repositories").await.expect("the platform's Repositories' Lease");
    let renewed = lease.spec.and_then(|s| s.renew_time);
    assert!(renewed.is_some(), "the tenant's executors serialised under the platform's Repositories' Lease");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let platform_session = platform.back_up().await;
    let phase = platform_session.status.and_then(|s| s.phase);
    assert_eq!(phase, Some(BackupSessionPhase::Succeeded), "the platform's own session");
    let expected = ("<h1>tenant</h1>".to_string(), Some(kube::ResourceExt::name_any(&tenant_session)));
    assert_eq!(restored_page(&mut tenant, "from-shared").await, expected, "the tenant restores its own data");
    // The tenant's finalize reported the Repository's numbers as its executor account; any other Pod
    // of the tenant may read the Repository but not rewrite its status (its integrity, say).
    let dir = tempfile::tempdir().expect("kubeconfig dir");
    fixtures::create::<k8s_openapi::api::core::v1::ServiceAccount>(&tenant.ns, json!({"metadata": {"name": "app"}}))
        .await;
    let other = support::executors::service_account_kubeconfig(&tenant.ns.name, "app", dir.path()).await;
    let as_other: Api<Repository> = Api::namespaced(support::client_for(&other).await, &platform.ns.name);
    as_other.get("repo").await.expect("any Pod of the tenant reads the Repository");
    let forged = json!({"status": {"integrity": true}});
    let patched = as_other.patch_status("repo", &PatchParams::default(), &Patch::Merge(&forged)).await;
    assert!(matches!(patched, Err(kube::Error::Api(ref e)) if e.code == 403), "{patched:?}");

    shared.patch("repo", &PatchParams::default(), &Patch::Merge(allow("Same"))).await.expect("revoked");
    let dir = tempfile::tempdir().expect("kubeconfig dir");
    let executor = support::executors::service_account_kubeconfig(&tenant.ns.name, "stash-backup", dir.path()).await;
    let as_tenant: Api<Repository> = Api::namespaced(support::client_for(&executor).await, &platform.ns.name);
    support::eventually("the tenant's executors to lose the Repository", Duration::from_secs(60), || {
        let as_tenant = as_tenant.clone();
        async move {
            match as_tenant.get("repo").await {
                Err(kube::Error::Api(e)) if e.code == 403 => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_lock_of_a_pod_named_host_of_elsewhere_is_never_removed() {
    // H3: a restic of another namespace (or cluster) holds a lock under a Pod-shaped host name that
    // is no Pod of this namespace. Ours must keep it, and so must not check or prune beside it.
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("foreign-lock", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    let repo_arg = repo.path().to_string_lossy().into_owned();
    setup.restic(&["-r", &repo_arg, "init"]);
    let holder = format!(
        "hostname app-7d9f8c-x2k4q && exec {} -r {repo_arg} backup --stdin --stdin-filename held.bin",
        backends::restic().display()
    );
    // A pipe kept open: restic waits on stdin and holds its lock (and refreshes it) until dropped.
    let mut child = Command::new("unshare")
        .args(["--uts", "sh", "-c", &holder])
        .envs(setup.secret.iter())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the holder starts");
    let stdin = child.stdin.take().expect("the holder's stdin");
    let _holder = support::executors::KilledOnDrop(child);
    // Asked of restic, not read from the directory: a lock being written is a temporary file first.
    // The test ends before restic's first refresh (5 minutes), which would give the lock a new id.
    let list_locks = |setup: &Setup| setup.restic(&["-r", &repo_arg, "list", "locks", "--no-lock"]);
    let start = Instant::now();
    let mut held = list_locks(&setup);
    while held.trim().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "the holder never took a lock");
        std::thread::sleep(Duration::from_millis(50));
        held = list_locks(&setup);
    }
    let held = held.trim().to_string();
    let content = setup.restic(&["-r", &repo_arg, "cat", "lock", &held, "--no-lock"]);
    assert!(content.contains("app-7d9f8c-x2k4q"), "{content}");

    // The finalize needs the repository to itself (check, prune): it waits for the live lock instead
    // of removing it or failing (M2), and goes on once the holder is done.
    let session = setup.back_up_without_finalize().await;
    let (restic, secret, repo, lock) = (backends::restic(), setup.secret.clone(), repo_arg.clone(), held.clone());
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let listed =
            Command::new(restic).args(["-r", &repo, "list", "locks", "--no-lock"]).envs(secret.iter()).output();
        let still_held = listed.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|id| id == lock));
        drop(stdin);
        still_held
    });
    setup.finalize(&session).await;
    assert!(release.join().expect("the releasing thread"), "the live lock was removed while the finalize waited");
    let events = setup.ns.api::<k8s_openapi::api::events::v1::Event>();
    let removed: Vec<_> = events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("StaleLockRemoved"))
        .filter_map(|e| e.note)
        .collect();
    assert!(removed.is_empty(), "{removed:?}");
    let status = setup.ns.api::<BackupSession>().get(&session).await.expect("session").status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:?}");
    let finalized = status.conditions.iter().find(|c| c.type_ == "SessionFinalized").expect("finalized");
    assert_eq!(finalized.status, stash::api::common::ConditionStatus::True, "{finalized:?}");
}

/// Files at `paths` (relative to `root`) with `content`.
fn write_files(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().expect("a parent")).expect("dirs");
        std::fs::write(file, content).expect("file");
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
}

/// (claim, mountPath) of each restore Job of `restore`, by Job name.
async fn restore_claims(setup: &Setup, restore: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let jobs = setup.ns.api::<k8s_openapi::api::batch::v1::Job>();
    let label = format!("stash.appscode.com/restore-batch={restore}");
    let listed = jobs.list(&kube::api::ListParams::default().labels(&label)).await.expect("Jobs").items;
    listed.iter().map(|j| (kube::ResourceExt::name_any(j), support::executors::claim_mounts(j))).collect()
}

/// H4/M14: a StatefulSet's volumeClaimTemplate `data` is claim `data-db-<ordinal>` for each Pod;
/// each ordinal restores its own host's snapshot into its own claim (never a PVC named `data`).
#[tokio::test(flavor = "multi_thread")]
async fn a_statefulset_restores_each_ordinal_into_its_own_claim() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("stsrestore", Backend::Local(repo.path())).await;
    fixtures::create::<k8s_openapi::api::apps::v1::StatefulSet>(
        &setup.ns,
        json!({"metadata": {"name": "db"}, "spec": {"replicas": 2, "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1",
                "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}]}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}),
    )
    .await;
    let member = json!({"target": {"alias": "db", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"}, "paths": ["/var/lib/db"]}});
    setup.batch(vec![member], json!({"timeOut": "5m"})).await;
    let pods = [tempfile::tempdir().expect("db-0"), tempfile::tempdir().expect("db-1")];
    let mut sidecars = Vec::new();
    for (ordinal, pod) in pods.iter().enumerate() {
        write_files(pod.path(), &[("var/lib/db/owner.txt", &format!("db-{ordinal}"))]);
        sidecars.push(setup.node.spawn_sidecar_in(BATCH, "StatefulSet", "db", &format!("db-{ordinal}"), pod.path()));
    }
    let session = setup.back_up().await;
    assert_eq!(session.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded));

    let claims = tempfile::tempdir().expect("claims");
    let member = json!({"target": {"alias": "db", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}]}});
    let restore = setup.restore_on("sts", vec![member], json!({}), Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    let mounted: Vec<Vec<(String, String)>> = restore_claims(&setup, "sts").await.into_values().collect();
    assert_eq!(
        mounted,
        [
            vec![("data-db-0".to_string(), "/stash-restore/var/lib/db".to_string())],
            vec![("data-db-1".to_string(), "/stash-restore/var/lib/db".to_string())]
        ]
    );
    for ordinal in 0..2 {
        assert_eq!(read(&claims.path().join(format!("data-db-{ordinal}/owner.txt"))), format!("db-{ordinal}"));
    }
    let status = restore.status.expect("status");
    let hosts: Vec<&str> = status.members[0].stats.iter().map(|s| s.hostname.as_str()).collect();
    assert_eq!((status.members[0].total_hosts, hosts.len()), (Some(2), 2), "{hosts:?}");
}

/// H4: a workload member with two mounts restores each into its own claim (the pod template's
/// volumes `html` and `uploads` are claims `web-html` and `web-uploads`).
#[tokio::test(flavor = "multi_thread")]
async fn a_workload_with_two_mounts_restores_each_into_its_own_claim() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("twomounts", Backend::Local(repo.path())).await;
    fixtures::create::<k8s_openapi::api::apps::v1::Deployment>(
        &setup.ns,
        json!({"metadata": {"name": "web"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}],
                "volumes": [{"name": "html", "persistentVolumeClaim": {"claimName": "web-html"}},
                            {"name": "uploads", "persistentVolumeClaim": {"claimName": "web-uploads"}}]}}}}),
    )
    .await;
    let member = json!({"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
        "paths": ["/var/www/html", "/var/www/uploads"]}});
    setup.batch(vec![member], json!({"timeOut": "5m"})).await;
    write_files(setup.node.root(), &[("var/www/html/index.html", "page"), ("var/www/uploads/index.html", "upload")]);
    let _sidecar = setup.node.spawn_sidecar(BATCH, "Deployment", "web", "web-5d8f7c9b4-abcde");
    setup.back_up().await;

    let claims = tempfile::tempdir().expect("claims");
    let member = json!({"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
        "volumeMounts": [{"name": "html", "mountPath": "/var/www/html"}, {"name": "uploads", "mountPath": "/var/www/uploads"}]}});
    let restore = setup.restore_on("web", vec![member], json!({}), Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(read(&claims.path().join("web-html/index.html")), "page");
    assert_eq!(read(&claims.path().join("web-uploads/index.html")), "upload");
    let mounted: Vec<Vec<(String, String)>> = restore_claims(&setup, "web").await.into_values().collect();
    let expected = [("web-html", "/stash-restore/var/www/html"), ("web-uploads", "/stash-restore/var/www/uploads")];
    assert_eq!(mounted, [expected.map(|(c, p)| (c.to_string(), p.to_string())).to_vec()]);
}

/// H4/M14: `rules[].exclude` leaves the excluded file as it is, and data that would land outside
/// every mounted volume fails the host instead of reporting Succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn restore_rules_exclude_files_and_data_outside_the_volumes_fails() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("exclude", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    setup.back_up().await;

    let claims = tempfile::tempdir().expect("claims");
    write_files(claims.path(), &[("uploads/index.html", "edited since")]);
    let member = json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"},
        "volumeMounts": [{"name": "uploads", "mountPath": "/stash-data/uploads"}],
        "rules": [{"exclude": ["/stash-data/uploads/index.html"]}]}});
    let restore = setup.restore_on("keep-index", vec![member], json!({}), Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(read(&claims.path().join("uploads/index.html")), "edited since", "the excluded file is untouched");
    assert_eq!(
        std::fs::metadata(claims.path().join("uploads/2026/11/invoice.pdf")).map(|m| m.len()).ok(),
        Some(300_000)
    );

    let elsewhere = json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"},
        "volumeMounts": [{"name": "uploads", "mountPath": "/srv/uploads"}]}});
    let restore = setup.restore_on("outside", vec![elsewhere], json!({}), Volumes::Claims(claims.path())).await;
    let status = restore.status.expect("status");
    assert_eq!(status.phase, Some(RestorePhase::Failed), "{status:?}");
    let error = status.members[0].stats[0].error.clone().unwrap_or_default();
    assert!(error.contains("outside every mounted volume"), "{error}");
}

/// A restore of snapshots a rule names opens the repository once per snapshot to check it (its
/// namespace and member, and where its files land) and once to restore it: each opening is a key
/// derivation (~0.5 s, BENCHMARKS.md). Another namespace's snapshot in the same repository is
/// refused before anything is written. A restore of the latest session reads the newest manifest
/// while it lists the repository.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_opens_the_repository_no_more_than_its_checks_need() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("named", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({})).await;
    setup.back_up().await;
    let url = repo.path().to_string_lossy().into_owned();
    let listed: Vec<Value> =
        serde_json::from_str(&setup.restic(&["-r", &url, "snapshots", "--json", "--no-lock"])).expect("JSON");
    let ours = listed.iter().find(|s| s["hostname"] != "stash-manifest").expect("the member's snapshot");
    let ours = ours["id"].as_str().expect("an id").to_string();
    let theirs_dir = tempfile::tempdir().expect("another namespace's data");
    write_files(theirs_dir.path(), &[("stash-data/uploads/index.html", "<h1>theirs</h1>")]);
    let tags = format!("batch={BATCH},session=elsewhere-1,namespace=elsewhere,member=uploads");
    let theirs = setup.restic(&["-r", &url, "backup", "--json", "--tag", &tags, &theirs_dir.path().to_string_lossy()]);
    let theirs = theirs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["snapshot_id"].as_str().map(str::to_string));
    let theirs = theirs.expect("the other namespace's snapshot id");

    let scratch = tempfile::tempdir().expect("scratch dir");
    let (restic, calls) = logging_restic(scratch.path());
    setup.node.restic = restic;
    let named = |id: &str| {
        json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"},
            "volumeMounts": [{"name": "uploads", "mountPath": "/stash-data/uploads"}], "rules": [{"snapshots": [id]}]}})
    };
    let claims = tempfile::tempdir().expect("claims");
    let restore = setup.restore_on("ours", vec![named(&ours)], Value::Null, Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(read(&claims.path().join("uploads/index.html")), "<h1>uploads</h1>");
    // Each restic run as `start <command>` and `end <command>`, in the order they happened.
    let runs = || -> Vec<String> {
        let ran = std::fs::read_to_string(&calls).unwrap_or_default();
        std::fs::remove_file(&calls).ok();
        let known = ["snapshots", "ls", "dump", "restore"];
        let run = |line: &str| -> Option<String> {
            let mut words = line.split_whitespace();
            let edge = words.next()?;
            Some(format!("{edge} {}", words.find(|w| known.contains(w))?))
        };
        ran.lines().filter_map(run).collect()
    };
    let ran = runs();
    let started: Vec<&str> = ran.iter().filter_map(|r| r.strip_prefix("start ")).collect();
    assert_eq!(started, ["ls", "restore"], "restic ran: {ran:?}");

    let latest = json!({"target": {"alias": "uploads", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"},
        "volumeMounts": [{"name": "uploads", "mountPath": "/stash-data/uploads"}]}});
    let claims = tempfile::tempdir().expect("claims");
    let restore = setup.restore_on("latest", vec![latest], Value::Null, Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(read(&claims.path().join("uploads/index.html")), "<h1>uploads</h1>");
    let ran = runs();
    let at = |run: &str| ran.iter().position(|r| r == run).unwrap_or_else(|| panic!("no {run} in {ran:?}"));
    assert!(
        at("start dump") < at("end snapshots"),
        "the newest manifest is read while the repository is listed: {ran:?}"
    );
    assert_eq!(ran.iter().filter(|r| *r == "start dump").count(), 1, "the manifest is read once: {ran:?}");
    assert!(at("end ls") < at("start restore") && at("end dump") < at("start restore"), "{ran:?}");

    let claims = tempfile::tempdir().expect("claims");
    let restore =
        setup.restore_on("theirs", vec![named(&theirs[..8])], Value::Null, Volumes::Claims(claims.path())).await;
    let status = restore.status.expect("status");
    assert_eq!(status.phase, Some(RestorePhase::Failed), "{status:?}");
    let error = status.members[0].stats[0].error.clone().unwrap_or_default();
    assert!(error.contains("neither a snapshot of member uploads in namespace"), "{error}");
    assert!(!claims.path().join("uploads/index.html").exists(), "nothing of theirs was written");
}

/// M2: a finalize needs the repository to itself (check, forget, prune take restic's exclusive
/// lock); a backup of another batch that holds the repository for longer than two minutes makes it
/// wait, not fail — the wait is bounded by a deadline, not by a fixed two minutes.
#[tokio::test(flavor = "multi_thread")]
async fn a_finalize_waits_for_a_backup_that_holds_the_repository_beyond_two_minutes() {
    use std::io::Write;
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("longlock", Backend::Local(repo.path())).await;
    let member = setup.pvc_member().await;
    setup.batch(vec![member], json!({"retentionPolicy": {"name": "last", "keepLast": 1, "prune": true}})).await;
    mark_uploads(&setup, "<h1>waited</h1>");
    let session = setup.back_up_without_finalize().await;

    // Another batch's long backup: restic reading stdin holds its (shared) lock until stdin closes.
    let mut holder = Command::new(backends::restic())
        .arg("-r")
        .arg(repo.path())
        .args(["backup", "--stdin", "--stdin-filename", "other-batch.sql", "--tag", "namespace=elsewhere"])
        .envs(setup.secret.iter())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("restic runs");
    let mut stdin = holder.stdin.take().expect("stdin");
    stdin.write_all(b"-- a dump that takes a while\n").expect("write");
    support::eventually("the long backup's lock", Duration::from_secs(30), || async {
        (lock_files(&repo.path().join("locks")) > 0).then_some(())
    })
    .await;
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(135));
        drop(stdin);
        holder.wait().expect("restic ends")
    });

    setup.finalize(&session).await;
    assert!(release.join().expect("the holder thread").success(), "the long backup itself succeeded");
    let finalized = setup.ns.api::<BackupSession>().get(&session).await.expect("session");
    let conditions = finalized.status.map(|s| s.conditions).unwrap_or_default();
    let done = conditions.iter().find(|c| c.type_ == "SessionFinalized").expect("SessionFinalized");
    assert_eq!(done.status, stash::api::common::ConditionStatus::True, "{conditions:?}");
    assert_eq!(restored_page(&mut setup, "after-wait").await, ("<h1>waited</h1>".into(), Some(session)));
}

/// A RestoreBatch in a fresh namespace (a clone, a move) restores the sessions of the namespace it
/// names in `restoreFrom.namespace`, through its own Repository and password; without naming it, it
/// sees none of them (namespaces never mix by accident).
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_namespace_restores_the_sessions_of_the_namespace_it_names() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut source = Setup::new("source", Backend::Local(repo.path())).await;
    let member = source.pvc_member().await;
    source.batch(vec![member], json!({})).await;
    mark_uploads(&source, "<h1>from the source namespace</h1>");
    let session = kube::ResourceExt::name_any(&source.back_up().await);

    let mut fresh = Setup::new("fresh", Backend::Local(repo.path())).await;
    let blind = tempfile::tempdir().expect("restore dir");
    let refused = fresh.restore_on("blind", vec![uploads_member()], json!({}), Volumes::Root(blind.path())).await;
    assert_eq!(refused.status.and_then(|s| s.phase), Some(RestorePhase::Failed), "nothing of its own to restore");

    let restored = tempfile::tempdir().expect("restore dir");
    let from = json!({"namespace": source.ns.name});
    let restore = fresh.restore("clone", vec![uploads_member()], from, restored.path()).await;
    assert_eq!(restore.status.and_then(|s| s.restored_session), Some(session));
    let page = std::fs::read_to_string(restored.path().join("stash-data/uploads/index.html")).expect("restored");
    assert_eq!(page, "<h1>from the source namespace</h1>");
}

/// A batch of one member, the Deployment `web` whose page (`/var/www/html`, claim `web-html`) its
/// sidecar backs up; the page is written, the sidecar not started.
async fn a_web_member(setup: &mut Setup) {
    fixtures::create::<k8s_openapi::api::apps::v1::Deployment>(
        &setup.ns,
        json!({"metadata": {"name": "web"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}],
                "volumes": [{"name": "html", "persistentVolumeClaim": {"claimName": "web-html"}}]}}}}),
    )
    .await;
    let member = json!({"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
        "paths": ["/var/www/html"]}});
    setup.batch(vec![member], json!({"timeOut": "5m"})).await;
    write_files(setup.node.root(), &[("var/www/html/index.html", "page")]);
}

/// An idle sidecar costs the API server its watch and nothing more: between sessions it reads no
/// batch and lists no session. It used to list its batch's sessions every 30 s and read the batch
/// for each one kept in the history: per injected Pod, whether or not anything was running. And in
/// a session it reads the batch once, not at every update of the session's status.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_sidecar_sends_no_request_but_its_watch() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("idle", Backend::Local(repo.path())).await;
    a_web_member(&mut setup).await;
    let started = k8s_openapi::jiff::Timestamp::now();
    let _sidecar = setup.node.spawn_sidecar(BATCH, "Deployment", "web", "web-5d8f7c9b4-abcde");
    let session = setup.back_up().await;
    assert_eq!(session.status.and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded), "the sidecar backed up");
    // The session's last updates reach the sidecar's watch within this.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = k8s_openapi::jiff::Timestamp::now();
    // Longer than the sidecar's 30 s between looks at its sessions.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let user = format!("system:serviceaccount:{}:{}", setup.ns.name, support::executors::WORKLOAD_ACCOUNT);
    let sent = support::audit::requests_since(&user, idle);
    assert!(sent.is_empty(), "the idle sidecar sent {sent:?}");
    let all = support::audit::requests_since(&user, started);
    let batch_reads: Vec<&String> =
        all.iter().filter(|r| r.starts_with("get ") && r.contains("/backupbatches/")).collect();
    assert_eq!(batch_reads.len(), 1, "the sidecar read its batch once for the session: {all:?}");
}

/// L10: the Lease a workload's sidecars take turns on goes with its batch (garbage collection), not
/// left behind in the namespace forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_targets_lease_goes_with_its_batch() {
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("leasegc", Backend::Local(repo.path())).await;
    a_web_member(&mut setup).await;
    let _sidecar = setup.node.spawn_sidecar(BATCH, "Deployment", "web", "web-5d8f7c9b4-abcde");
    setup.back_up().await;
    let leases = setup.ns.api::<Lease>();
    let name = format!("stash-{BATCH}-deployment-web");
    assert!(leases.get_opt(&name).await.expect("get").is_some(), "the sidecar took the target's Lease");

    setup.ns.api::<BackupBatch>().delete(BATCH, &Default::default()).await.expect("delete the batch");
    support::eventually("the target's Lease gone with its batch", Duration::from_secs(60), || {
        let (leases, name) = (leases.clone(), name.clone());
        async move { leases.get_opt(&name).await.ok()?.is_none().then_some(()) }
    })
    .await;
}

/// M6: a member's `target.args` reach restic only through an allow-list. A batch passing
/// `--password-command` is Invalid, its condition naming the field and the flag (not the command);
/// it gets no CronJob, and a session started by hand fails without a Job: the command never runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_passing_restic_a_password_command_is_refused_and_runs_nothing() {
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use stash::api::backup_batch::BackupInvokerPhase;
    use stash::api::common::ConditionStatus;
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("args-refused", Backend::Local(repo.path())).await;
    let marker = setup.node.root().join("password-command-ran");
    let mut member = setup.pvc_member().await;
    member["target"]["args"] = json!(["--exclude", "*.tmp", format!("--password-command=touch {}", marker.display())]);
    setup.batch(vec![member], json!({"schedule": "*/5 * * * *"})).await;

    let batches = setup.ns.api::<BackupBatch>();
    let batch = support::eventually("the batch to be Invalid", Duration::from_secs(60), || {
        let batches = batches.clone();
        async move {
            let batch = batches.get(BATCH).await.ok()?;
            (batch.status.as_ref()?.phase == Some(BackupInvokerPhase::Invalid)).then_some(batch)
        }
    })
    .await;
    let conditions = batch.status.map(|s| s.conditions).unwrap_or_default();
    let condition = |type_: &str| conditions.iter().find(|c| c.type_ == type_).expect(type_).clone();
    let validation = condition("ValidationPassed");
    assert_eq!(
        (validation.status, validation.reason.as_deref()),
        (ConditionStatus::False, Some("ResticFlagNotAllowed"))
    );
    let message = validation.message.unwrap_or_default();
    assert!(message.starts_with("spec.members[0].target.args[2]: --password-command is not"), "{message}");
    assert!(!message.contains("touch"), "the flag's value is not quoted: {message}");
    assert_eq!(condition("CronJobCreated").status, ConditionStatus::False);
    let cronjobs = setup.ns.api::<CronJob>().list(&Default::default()).await.expect("list CronJobs");
    assert!(cronjobs.items.is_empty(), "no trigger CronJob for an invalid batch");

    let client = support::client().await;
    let session = stash::session::create_backup_session(client, &setup.ns.name, BATCH, None).await.expect("session");
    let sessions = setup.ns.api::<BackupSession>();
    let failed =
        fixtures::session_phase(&sessions, &kube::ResourceExt::name_any(&session), BackupSessionPhase::Failed).await;
    let failure = failed.status.map(|s| s.conditions).unwrap_or_default();
    let failure =
        failure.iter().find(|c| c.type_ == "SessionFailed").and_then(|c| c.message.clone()).unwrap_or_default();
    assert!(failure.contains("the batch is invalid: spec.members[0].target.args[2]: --password-command"), "{failure}");
    // Only the session's finalize Job (which writes no manifest for a failed session), no backup Job.
    let ran: Vec<String> = setup.node.run_new_jobs().await.into_iter().map(|(job, _)| job).collect();
    let jobs = setup.ns.api::<Job>().list(&Default::default()).await.expect("list Jobs").items;
    let listed: Vec<String> = jobs.iter().map(kube::ResourceExt::name_any).collect();
    assert!(ran.iter().chain(&listed).all(|job| job.ends_with("-finalize")), "{ran:?} {listed:?}");
    assert!(!marker.exists(), "the password command never ran");
}

/// M6, defence in depth: allowed flags reach the real restic (`--exclude` leaves `*.tmp` out), and
/// a flag added to the batch after its session started (the controllers checked it before) is
/// refused by the executor itself, naming the field and the flag, before restic runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_executor_refuses_restic_flags_added_after_the_session_started() {
    use k8s_openapi::api::batch::v1::Job;
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("args-executor", Backend::Local(repo.path())).await;
    let marker = setup.node.root().join("password-command-ran");
    let mut member = setup.pvc_member().await;
    member["target"]["args"] = json!(["--exclude", "*.tmp", "--one-file-system"]);
    write_files(setup.node.root(), &[("stash-data/uploads/scratch.tmp", "left out")]);
    setup.batch(vec![member], json!({})).await;
    let good = setup.back_up().await;
    assert_eq!(good.status.as_ref().and_then(|s| s.phase), Some(BackupSessionPhase::Succeeded), "{:?}", good.status);
    let listed =
        setup.restic(&["-r", &repo.path().to_string_lossy(), "ls", "latest", "--no-lock", "--host", "uploads"]);
    assert!(listed.contains("/stash-data/uploads/index.html"), "{listed}");
    assert!(!listed.contains("scratch.tmp"), "--exclude reached restic: {listed}");

    let client = support::client().await;
    let session = stash::session::create_backup_session(client, &setup.ns.name, BATCH, None).await.expect("session");
    let name = kube::ResourceExt::name_any(&session);
    let jobs = setup.ns.api::<Job>();
    support::eventually("the session's backup Job", Duration::from_secs(60), || {
        let (jobs, name) = (jobs.clone(), name.clone());
        async move {
            let selector = format!("stash.appscode.com/backup-session={name}");
            let listed = jobs.list(&kube::api::ListParams::default().labels(&selector)).await.ok()?;
            (!listed.items.is_empty()).then_some(())
        }
    })
    .await;
    let args = json!(["--exclude", "*.tmp", format!("--password-command=touch {}", marker.display())]);
    let patch = json!({"spec": {"members": [{"target": {"alias": "uploads", "args": args,
        "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads"},
        "volumeMounts": [{"name": "uploads", "mountPath": "/stash-data/uploads"}]}}]}});
    let batches = setup.ns.api::<BackupBatch>();
    batches.patch(BATCH, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.expect("patch");
    setup.run_until_final(&name).await;

    let status = setup.ns.api::<BackupSession>().get(&name).await.expect("session").status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Failed), "{status:?}");
    let error = status.targets[0].stats[0].error.clone().unwrap_or_default();
    assert!(!marker.exists(), "the password command never ran");
    assert!(error.starts_with("spec.members[0].target.args[2]: --password-command is not"), "{error}");
}

/// Backs up `path` (absolute, as Stash's sidecar did) with the plain restic CLI in Stash's layout:
/// no tags, the member's alias as `--host`, taken at `time`; returns the snapshot id.
fn stash_backup(setup: &Setup, repo: &str, host: &str, time: &str, path: &Path) -> String {
    let printed =
        setup.restic(&["-r", repo, "backup", "--json", "--host", host, "--time", time, &path.to_string_lossy()]);
    let summary =
        printed.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v["message_type"] == "summary");
    summary.and_then(|s| s["snapshot_id"].as_str().map(str::to_string)).expect("a snapshot id")
}

/// Issue 12: a repository Stash wrote (no session manifests: per-host snapshots, paths as backed up,
/// a database dump read from stdin as `dumpfile.sql`) restores through a verbatim-style RestoreBatch
/// without `restoreFrom`: each host's latest snapshot by default, `rules[]` picking the first rule
/// whose `targetHosts` match, `sourceHost` and named `snapshots` obeyed — and a rule naming a host
/// the repository does not hold fails that host by name.
#[tokio::test(flavor = "multi_thread")]
async fn a_repository_stash_wrote_restores_through_its_rules() {
    let pg = backends::postgres();
    seed_database(pg.port);
    let repo = tempfile::tempdir().expect("repo dir");
    let url = repo.path().to_string_lossy().into_owned();
    let mut setup = Setup::new("stashlayout", Backend::Local(repo.path())).await;
    setup.restic(&["-r", &url, "init"]);
    let source = tempfile::tempdir().expect("the app's files");
    let html = source.path().join("var/www/html");
    let mut ids = BTreeMap::new();
    for (host, time, page) in [
        ("app", "2026-01-01 10:00:00", "old"),
        ("app", "2026-01-02 10:00:00", "new"),
        ("staging", "2026-01-03 10:00:00", "staging"),
    ] {
        write_files(&html, &[("index.html", page)]);
        ids.insert(page, stash_backup(&setup, &url, host, time, &html));
    }
    let before = table_checksum(pg.port);
    let mut dump = Command::new("pg_dump")
        .args(["--clean", "--if-exists", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "shop"])
        .env("PGPASSWORD", PG_PASSWORD)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pg_dump runs");
    let stored = Command::new(backends::restic())
        .args(["-r", &url, "backup", "--stdin", "--stdin-filename", "dumpfile.sql", "--host", "db"])
        .envs(setup.secret.iter())
        .stdin(dump.stdout.take().expect("the dump's output"))
        .output()
        .expect("restic runs");
    assert!(stored.status.success(), "{}", String::from_utf8_lossy(&stored.stderr));
    assert!(dump.wait().expect("pg_dump ends").success(), "pg_dump");
    psql(pg.port, "shop", "DELETE FROM items WHERE id % 2 = 0");
    assert_ne!(table_checksum(pg.port), before);

    fixtures::create::<k8s_openapi::api::apps::v1::Deployment>(
        &setup.ns,
        json!({"metadata": {"name": "wordpress-app"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "wp"}},
            "template": {"metadata": {"labels": {"app": "wp"}}, "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}],
                "volumes": [{"name": "storage", "persistentVolumeClaim": {"claimName": "wp-html"}}]}}}}),
    )
    .await;
    let db = setup.database_member(pg.port).await;
    let db = json!({"target": {"alias": "db", "ref": db["target"]["ref"], "rules": [{"snapshots": ["latest"]}]},
                    "task": {"name": "postgres-restore-15"}});
    let app = |rules: Value| {
        json!({"target": {"alias": "app", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wordpress-app"},
               "rules": rules, "volumeMounts": [{"name": "storage", "mountPath": html.to_string_lossy()}]}})
    };
    let page = |claims: &Path| read(&claims.join("wp-html/index.html"));

    let claims = tempfile::tempdir().expect("claims");
    let restore = setup
        .restore_on("latest", vec![db, app(json!([{"paths": [html]}]))], Value::Null, Volumes::Claims(claims.path()))
        .await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(page(claims.path()), "new", "the latest snapshot of host app");
    assert_eq!(table_checksum(pg.port), before, "the dump Stash stored is replayed");

    let claims = tempfile::tempdir().expect("claims");
    let rules = json!([{"targetHosts": ["elsewhere"], "snapshots": [ids["old"]]}, {"sourceHost": "staging"}]);
    let restore = setup.restore_on("source-host", vec![app(rules)], Value::Null, Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(page(claims.path()), "staging", "the first rule for host app: the latest of host staging");

    let claims = tempfile::tempdir().expect("claims");
    let named = json!([{"snapshots": [ids["staging"], &ids["old"][..8]]}]);
    let restore = setup.restore_on("named", vec![app(named)], Value::Null, Volumes::Claims(claims.path())).await;
    assert_eq!(restore.status.as_ref().and_then(|s| s.phase), Some(RestorePhase::Succeeded), "{:?}", restore.status);
    assert_eq!(page(claims.path()), "old", "the snapshots the rule names, in its order: the last one's files win");

    let claims = tempfile::tempdir().expect("claims");
    let missing = json!([{"sourceHost": "prod"}]);
    let restore = setup.restore_on("missing", vec![app(missing)], Value::Null, Volumes::Claims(claims.path())).await;
    let status = restore.status.expect("status");
    assert_eq!(status.phase, Some(RestorePhase::Failed), "{status:?}");
    let error = status.members[0].stats[0].error.clone().unwrap_or_default();
    assert!(error.contains("host prod"), "{error}");
}

/// Issue 12: a PostgreSQL database named by a Stash/KubeDB AppBinding (its `clientConfig.url`, its auth
/// Secret's `username`/`password`) is dumped by a real `pg_dump` into restic and loaded back by `psql`
/// through a RestoreBatch member naming the same AppBinding — the executor reading the endpoint
/// from the Pod's annotations and the credentials from the Secret, as the kubelet projects them.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_backs_up_and_restores_through_an_appbinding_member() {
    let _crd = support::app_binding::installed().await;
    let pg = backends::postgres();
    seed_database(pg.port);
    let repo = tempfile::tempdir().expect("repo dir");
    let mut setup = Setup::new("appbinding", Backend::Local(repo.path())).await;
    fixtures::create::<Secret>(
        &setup.ns,
        json!({"metadata": {"name": "shop-db-auth"}, "stringData": {"username": "postgres", "password": PG_PASSWORD}}),
    )
    .await;
    let url = format!("postgres://127.0.0.1:{}/shop?sslmode=disable", pg.port);
    support::app_binding::create(
        &setup.ns,
        "shop-db",
        json!({"type": "kubedb.com/postgres", "version": "15", "secret": {"name": "shop-db-auth"}, "clientConfig": {"url": url}}),
    )
    .await;
    let member = |task: &str| {
        json!({"target": {"alias": "shop-db", "ref": {"apiVersion": "appcatalog.appscode.com/v1alpha1", "kind": "AppBinding", "name": "shop-db"}},
               "task": {"name": task}})
    };
    setup.batch(vec![member("postgres-backup-15.1")], json!({"timeOut": "10m"})).await;

    let session = setup.back_up().await;
    let status = session.status.clone().expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded), "{status:?}");
    let host = &status.targets[0].stats[0];
    assert_eq!((host.phase, host.snapshots[0].path.as_deref()), (Some(HostPhase::Succeeded), Some("/shop.sql")));
    let repo_url = repo.path().to_string_lossy().into_owned();
    let listing = setup.restic(&["-r", &repo_url, "ls", "--no-lock", &host.snapshots[0].name]);
    assert!(listing.lines().any(|l| l == "/shop.sql"), "{listing}");

    let before = table_checksum(pg.port);
    psql(pg.port, "shop", "DELETE FROM items WHERE id % 2 = 0; UPDATE items SET note = 'changed'");
    assert_ne!(table_checksum(pg.port), before);
    let restored = tempfile::tempdir().expect("restore dir");
    setup.restore("restore-db", vec![member("postgres-restore-15.1")], json!({}), restored.path()).await;
    assert_eq!(table_checksum(pg.port), before, "the database named by the AppBinding is back as it was");
}
