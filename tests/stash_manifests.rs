//! Every manifest of Stash's docs that Stash's own CRDs accept applies, unchanged, to ours: a strict
//! server-side create (an unknown field is an error, not a silent prune) that the API server would
//! store with every field that was sent, and a Stash-written `status` that the status subresource keeps
//! whole. The manifests live beside the repository (`../shared/stash-manifests`, verbatim from
//! Stash's docs, `INDEX.tsv` naming each source); without them the test says so and passes.

mod support;

use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use support::{FIELD_MANAGER, TestNamespace};

const MANIFESTS: &str = "../shared/stash-manifests";

/// Fields that Stash v0.42.1's CRDs lack too (found by a strict dry-run of every document under
/// Stash's own CRDs): a document carrying one is a pre-release draft, an old status or a typo that
/// Stash refuses as well, so it is no compatibility case.
const NOT_IN_STASH: &[(&str, &str)] = &[
    ("spec.backupConfigurationTemplates", "a BackupBatch draft of December 2019"),
    ("spec.backupConfiguration", "a BackupSession of 2019, before `invoker`"),
    ("status.stats", "a BackupSession status of 2019"),
    ("status.totalHosts", "a BackupSession status of 2019"),
    ("spec.backupPath", "a Repository of 2018"),
    ("spec.backend.local.volumeSource", "a Repository of 2018"),
    ("status.backupCount", "a Repository status of 2018-2019"),
    ("status.lastBackupDuration", "a Repository status of 2018-2019"),
    ("status.lastSuccessfulBackupTime", "a Repository status of 2018-2019"),
    ("status.size", "a Repository status of 2019"),
    ("metadata.clusterName", "ObjectMeta lost clusterName in Kubernetes 1.25"),
    ("metadata.lables", "a typo of `labels`"),
];

/// Where the API server serves one of our kinds.
struct Served {
    group: String,
    version: String,
    plural: String,
}

/// Our kinds by name, from the CRDs we install.
fn served_kinds() -> BTreeMap<String, Served> {
    stash::api::crds()
        .into_iter()
        .map(|crd| {
            let version = crd.spec.versions.iter().find(|v| v.served).expect("a served version").name.clone();
            let served = Served { group: crd.spec.group.clone(), version, plural: crd.spec.names.plural.clone() };
            (crd.spec.names.kind.clone(), served)
        })
        .collect()
}

/// What became of one document.
enum Verdict {
    Accepted { with_status: bool },
    Refused(String),
    NotAStashCase(String),
    OtherKind(String),
}

/// The manifest files, and which of them are in Stash's current docs (INDEX.tsv's `current`).
fn manifest_files(dir: &Path) -> (Vec<PathBuf>, BTreeSet<String>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let index = std::fs::read_to_string(dir.join("INDEX.tsv")).unwrap_or_default();
    let mut rows = index.lines().map(|line| line.split('\t').collect::<Vec<_>>());
    let header = rows.next().unwrap_or_default();
    let column = |name: &str| header.iter().position(|c| *c == name);
    let current = match (column("file"), column("current")) {
        (Some(file), Some(current)) => rows
            .filter(|row| row.get(current) == Some(&"True"))
            .filter_map(|row| row.get(file).map(|f| f.to_string()))
            .collect(),
        _ => BTreeSet::new(),
    };
    (files, current)
}

/// The value at a dotted `path`, if the document has it.
fn at<'a>(document: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(document, |value, key| value.get(key))
}

/// Why Stash's own CRDs refuse `document` too, if they do.
fn not_in_stash(document: &Value, served: &Served) -> Option<String> {
    let api_version = document["apiVersion"].as_str().unwrap_or_default();
    if api_version != format!("{}/{}", served.group, served.version) {
        return Some(format!("apiVersion {api_version}: Stash serves this kind only as {}", served.version));
    }
    NOT_IN_STASH.iter().find(|(path, _)| at(document, path).is_some()).map(|(path, why)| format!("{path}: {why}"))
}

/// The paths under which `sent` has something that `returned` lacks or holds otherwise. A null
/// sent is an absent field.
fn missing(sent: &Value, returned: &Value, path: &str, out: &mut Vec<String>) {
    match (sent, returned) {
        (Value::Null, _) => {}
        (Value::Object(sent), Value::Object(returned)) => {
            for (key, value) in sent {
                let path = format!("{path}.{key}");
                match returned.get(key) {
                    Some(back) => missing(value, back, &path, out),
                    None if value.is_null() => {}
                    None => out.push(path),
                }
            }
        }
        (Value::Array(sent), Value::Array(returned)) if sent.len() == returned.len() => {
            for (i, (value, back)) in sent.iter().zip(returned).enumerate() {
                missing(value, back, &format!("{path}[{i}]"), out);
            }
        }
        (sent, returned) if sent == returned => {}
        (sent, returned) => out.push(format!("{path} (sent {sent}, got {returned})")),
    }
}

/// What the user wrote of `document`, without `status` and the metadata the server owns.
fn user_part(document: &Value) -> Value {
    let mut part = document.as_object().cloned().unwrap_or_default();
    part.remove("status");
    let metadata: Map<String, Value> = ["name", "labels", "annotations"]
        .iter()
        .filter_map(|key| document["metadata"].get(*key).map(|v| (key.to_string(), v.clone())))
        .collect();
    part.insert("metadata".into(), Value::Object(metadata));
    Value::Object(part)
}

async fn request(ns: &TestNamespace, request: http::Request<Vec<u8>>) -> Result<Value, String> {
    ns.client.request::<Value>(request).await.map_err(|e| match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    })
}

fn collection(ns: &TestNamespace, served: &Served) -> String {
    format!("/apis/{}/{}/namespaces/{}/{}", served.group, served.version, ns.name, served.plural)
}

/// A create with `fieldValidation=Strict`, dry-run unless `persist`; what the API server would store.
async fn create(ns: &TestNamespace, served: &Served, document: &Value, persist: bool) -> Result<Value, String> {
    let dry_run = if persist { "" } else { "&dryRun=All" };
    let uri = format!("{}?fieldValidation=Strict&fieldManager={FIELD_MANAGER}{dry_run}", collection(ns, served));
    let body = serde_json::to_vec(document).map_err(|e| e.to_string())?;
    let post = http::Request::post(uri).header("content-type", "application/json").body(body);
    request(ns, post.map_err(|e| e.to_string())?).await
}

/// Writes `status` through the status subresource of the stored object `name` (a strict dry-run)
/// and lists what did not come back.
async fn write_status(ns: &TestNamespace, served: &Served, name: &str, status: &Value) -> Result<Vec<String>, String> {
    let uri = format!(
        "{}/{name}/status?fieldValidation=Strict&fieldManager={FIELD_MANAGER}&dryRun=All",
        collection(ns, served)
    );
    let body = serde_json::to_vec(&serde_json::json!({"status": status})).map_err(|e| e.to_string())?;
    let patch = http::Request::patch(uri).header("content-type", "application/merge-patch+json").body(body);
    let returned = request(ns, patch.map_err(|e| e.to_string())?).await?;
    let mut lost = Vec::new();
    missing(status, &returned["status"], "status", &mut lost);
    Ok(lost)
}

/// One of our kinds' documents: refused, or accepted with every field, and its status kept.
async fn judge(ns: &TestNamespace, served: &Served, document: &Value, ordinal: usize) -> Verdict {
    let mut sent = document.clone();
    sent["metadata"]["namespace"] = ns.name.clone().into();
    let returned = match create(ns, served, &sent, false).await {
        Ok(returned) => returned,
        Err(refusal) => return Verdict::Refused(refusal),
    };
    let mut lost = Vec::new();
    missing(&user_part(&sent), &returned, "", &mut lost);
    if !lost.is_empty() {
        return Verdict::Refused(format!("accepted, but the API server dropped or changed {}", lost.join(", ")));
    }
    let Some(status) = document.get("status").filter(|s| !s.is_null()) else {
        return Verdict::Accepted { with_status: false };
    };
    // The status subresource ignores `status` on create: store the object (under a name of its own,
    // without finalizers that would hold the namespace), then write Stash's status to it.
    let name = format!("doc-{ordinal}");
    let mut stored = user_part(&sent);
    stored["metadata"]["name"] = name.clone().into();
    stored["metadata"]["namespace"] = ns.name.clone().into();
    if let Err(refusal) = create(ns, served, &stored, true).await {
        return Verdict::Refused(format!("the dry run passed but the create failed: {refusal}"));
    }
    match write_status(ns, served, &name, status).await {
        Ok(lost) if lost.is_empty() => Verdict::Accepted { with_status: true },
        Ok(lost) => Verdict::Refused(format!("status written, but {} dropped or changed", lost.join(", "))),
        Err(refusal) => Verdict::Refused(format!("status refused: {refusal}")),
    }
}

#[tokio::test]
async fn every_manifest_stash_accepts_is_accepted_unchanged() {
    let dir = support::repo_root().join(MANIFESTS);
    if !dir.is_dir() {
        eprintln!("SKIPPED: {} is absent (Stash's docs manifests live beside the repository)", dir.display());
        return;
    }
    let (files, current) = manifest_files(&dir);
    let served = served_kinds();
    let ns = TestNamespace::new("stash-docs").await;
    let mut verdicts: Vec<(String, String, Verdict)> = Vec::new();
    for path in &files {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let label = format!("{file}#{index}");
            let document = match Value::deserialize(document) {
                Ok(Value::Null) => continue,
                Ok(document) => document,
                Err(e) => {
                    verdicts.push((label, String::new(), Verdict::Refused(format!("not YAML we can read: {e}"))));
                    continue;
                }
            };
            let kind = document["kind"].as_str().unwrap_or("(no kind)").to_string();
            let verdict = match served.get(&kind) {
                None => Verdict::OtherKind(kind.clone()),
                Some(ours) => match not_in_stash(&document, ours) {
                    Some(why) => Verdict::NotAStashCase(why),
                    None => judge(&ns, ours, &document, verdicts.len()).await,
                },
            };
            let current = if current.contains(&file) { "current" } else { "historical" };
            verdicts.push((label, format!("{kind}, {current}"), verdict));
        }
    }

    let (mut accepted, mut statuses, mut refused, mut not_stash) = (0, 0, Vec::new(), 0);
    let mut other_kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (label, what, verdict) in &verdicts {
        match verdict {
            Verdict::Accepted { with_status } => {
                accepted += 1;
                statuses += usize::from(*with_status);
                let status = if *with_status { " (status kept)" } else { "" };
                eprintln!("accepted  {label} [{what}]{status}");
            }
            Verdict::Refused(why) => {
                eprintln!("REFUSED   {label} [{what}]: {why}");
                refused.push(format!("{label}: {why}"));
            }
            Verdict::NotAStashCase(why) => {
                not_stash += 1;
                eprintln!("not Stash {label} [{what}]: Stash's CRDs refuse it too: {why}");
            }
            Verdict::OtherKind(kind) => *other_kinds.entry(kind.clone()).or_default() += 1,
        }
    }
    eprintln!(
        "{} files: {accepted} accepted ({statuses} with their status written back), {} refused, of {} documents \
         Stash accepts; {not_stash} that Stash refuses too; other kinds skipped: {other_kinds:?}",
        files.len(),
        refused.len(),
        accepted + refused.len(),
    );
    assert!(accepted + refused.len() > 0, "no document of our kinds in {}", dir.display());
    assert!(refused.is_empty(), "{} of Stash's documents are refused:\n{}", refused.len(), refused.join("\n"));
}

/// The comparison catches what a structural schema prunes silently, and a rewritten value.
#[test]
fn a_dropped_or_changed_field_is_named() {
    let sent = serde_json::json!({"spec": {"local": {"mountPath": "/r", "gcePersistentDisk": {"pdName": "d"}},
        "list": [1, 2], "gone": null}});
    let pruned = serde_json::json!({"spec": {"local": {"mountPath": "/r"}, "list": [1, 3], "added": true}});
    let mut lost = Vec::new();
    missing(&sent, &pruned, "", &mut lost);
    assert_eq!(lost, [".spec.list[1] (sent 2, got 3)", ".spec.local.gcePersistentDisk"]);
    lost.clear();
    missing(&sent, &sent, "", &mut lost);
    assert!(lost.is_empty(), "{lost:?}");
}

/// The field-by-field compatibility table, checked against our schema and Stash's docs.
const COMPATIBILITY: &str = "docs/compatibility.md";
/// How a row's verdict may begin, so that every field says plainly what becomes of it.
const VERDICTS: &[&str] = &["**works**", "**refused**", "**accepted, not acted on**", "**kept**", "**ours**"];

/// One row: a field of `kind` and everything under it.
struct Row {
    kind: String,
    path: String,
    verdict: String,
}

/// The rows of the table, in file order: `## Kind` headings, then `| `path` | docs | verdict |`.
fn table_rows(text: &str) -> Vec<Row> {
    let mut kind = String::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            kind = heading.split_whitespace().next().unwrap_or_default().to_string();
        } else if let Some(rest) = line.strip_prefix("| `") {
            let cells: Vec<&str> = rest.splitn(3, '|').map(str::trim).collect();
            if let [path, _docs, verdict] = cells[..] {
                let path = path.trim_end_matches('`').to_string();
                let verdict = verdict.trim_end_matches('|').trim().to_string();
                rows.push(Row { kind: kind.clone(), path, verdict });
            }
        }
    }
    rows
}

/// Every leaf under `schema` (an array's items are `[]`), as dotted paths from `path`.
fn schema_leaves(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(items) = schema.get("items") {
        return schema_leaves(items, &format!("{path}[]"), out);
    }
    match schema.get("properties").and_then(Value::as_object) {
        Some(properties) => {
            for (key, property) in properties {
                schema_leaves(property, &format!("{path}.{key}"), out);
            }
        }
        None => out.push(path.to_string()),
    }
}

/// Every value a document sets, as dotted paths from `path` (an array's entries are `[]`); an empty
/// object or list and a null set nothing.
fn document_leaves(value: &Value, path: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                document_leaves(value, &format!("{path}.{key}"), out);
            }
        }
        Value::Array(items) => {
            for item in items {
                document_leaves(item, &format!("{path}[]"), out);
            }
        }
        Value::Null => {}
        _ => {
            out.insert(path.to_string());
        }
    }
}

/// The row of `kind` that owns `path`: the longest whose path is it or a parent of it.
fn owner(rows: &[Row], kind: &str, path: &str) -> Option<usize> {
    let under = |row: &Row| {
        path == row.path || path.starts_with(&format!("{}.", row.path)) || path.starts_with(&format!("{}[]", row.path))
    };
    rows.iter()
        .enumerate()
        .filter(|(_, r)| r.kind == kind && under(r))
        .max_by_key(|(_, r)| r.path.len())
        .map(|(i, _)| i)
}

/// How many of Stash's docs documents (those Stash's CRDs accept) set something under each row.
fn docs_usage(rows: &[Row], problems: &mut Vec<String>) -> Option<Vec<usize>> {
    let dir = support::repo_root().join(MANIFESTS);
    if !dir.is_dir() {
        return None;
    }
    let served = served_kinds();
    let mut users = vec![0; rows.len()];
    for path in manifest_files(&dir).0 {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let Ok(document) = Value::deserialize(document) else { continue };
            let kind = document["kind"].as_str().unwrap_or_default();
            let Some(ours) = served.get(kind) else { continue };
            if not_in_stash(&document, ours).is_some() {
                continue;
            }
            let mut leaves = BTreeSet::new();
            for part in ["spec", "status"] {
                document_leaves(&document[part], part, &mut leaves);
            }
            let mut owners = BTreeSet::new();
            for leaf in &leaves {
                match owner(rows, kind, leaf) {
                    Some(row) => {
                        owners.insert(row);
                    }
                    None => problems.push(format!("{kind} {leaf}: set in {} but in no row", path.display())),
                }
            }
            for row in owners {
                users[row] += 1;
            }
        }
    }
    Some(users)
}

/// Every field of our schema is in exactly one row of docs/compatibility.md, which says what becomes of
/// it; every row names something our schema has; the count of Stash's docs documents using each row
/// is current. `STASH_WRITE_COMPATIBILITY=1` rewrites the counts (the verdicts are written by hand).
#[test]
fn the_compatibility_table_covers_every_field_of_our_schema() {
    let file = support::repo_root().join(COMPATIBILITY);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let rows = table_rows(&text);
    let mut problems = Vec::new();
    let mut owned = vec![0; rows.len()];
    for crd in stash::api::crds() {
        let kind = crd.spec.names.kind.clone();
        let version = crd.spec.versions.iter().find(|v| v.served).expect("a served version");
        let schema = serde_json::to_value(&version.schema).expect("a schema");
        let mut leaves = Vec::new();
        for part in ["spec", "status"] {
            if let Some(schema) = schema["openAPIV3Schema"]["properties"].get(part) {
                schema_leaves(schema, part, &mut leaves);
            }
        }
        for leaf in leaves {
            match owner(&rows, &kind, &leaf) {
                Some(row) => owned[row] += 1,
                None => problems.push(format!("{kind} {leaf}: in our schema but in no row")),
            }
        }
    }
    for (row, count) in rows.iter().zip(&owned) {
        if *count == 0 {
            problems.push(format!("{} {}: a row for a field our schema does not have", row.kind, row.path));
        }
        if !VERDICTS.iter().any(|v| row.verdict.starts_with(v)) {
            problems.push(format!("{} {}: the verdict must start with one of {VERDICTS:?}", row.kind, row.path));
        }
    }
    if let Some(users) = docs_usage(&rows, &mut problems) {
        let mut next = 0;
        let written: Vec<String> = text
            .lines()
            .map(|line| match line.strip_prefix("| `") {
                Some(_) if next < rows.len() => {
                    let row = &rows[next];
                    next += 1;
                    format!("| `{}` | {} | {} |", row.path, users[next - 1], row.verdict)
                }
                _ => line.to_string(),
            })
            .collect();
        let written = written.join("\n") + "\n";
        if written != text {
            if std::env::var_os("STASH_WRITE_COMPATIBILITY").is_some() {
                std::fs::write(&file, &written).expect("rewriting the table");
            } else {
                problems
                    .push(format!("the docs counts are stale: run with STASH_WRITE_COMPATIBILITY=1 ({COMPATIBILITY})"));
            }
        }
    }
    assert!(problems.is_empty(), "{COMPATIBILITY}:\n{}", problems.join("\n"));
}
