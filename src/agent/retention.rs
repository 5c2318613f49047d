//! The rules that keep restorable sets safe, as pure functions of what the API and the repository
//! show (README "Guarantees"): when a session earns a manifest, and which snapshots retention may
//! forget. `finalize` observes, calls these, and acts; the property test at the bottom plays random
//! histories against them.

use super::manifest::{MANIFEST_TAG, Manifest, ManifestHost, ManifestMember};
use crate::api::BackupSession;
use crate::api::backup_session::{BackupSessionPhase, HostPhase, TargetPhase};
use crate::restic::output::Snapshot;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use std::collections::BTreeSet;

/// Tag of every snapshot and manifest: the namespace of the batch that wrote it. Two namespaces'
/// same-named batches may share one repository; this keeps their sets apart.
pub(crate) const NAMESPACE_TAG: &str = "namespace";

/// Whose snapshot this is, by its tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// `batch=` and `namespace=` are ours.
    Ours,
    /// `batch=` is ours and it carries no namespace: written before snapshots were tagged with one.
    /// Readable (a manifest's body names its namespace), never forgotten by retention.
    Legacy,
    Foreign,
}

pub(crate) fn ownership(snapshot: &Snapshot, namespace: &str, batch: &str) -> Ownership {
    if snapshot.tag("batch") != Some(batch) {
        return Ownership::Foreign;
    }
    match snapshot.tag(NAMESPACE_TAG) {
        Some(ns) if ns == namespace => Ownership::Ours,
        Some(_) => Ownership::Foreign,
        None => Ownership::Legacy,
    }
}

pub(crate) fn is_manifest(snapshot: &Snapshot) -> bool {
    snapshot.tags.iter().any(|t| t == MANIFEST_TAG)
}

/// The manifest `session` earns, or why it earns none. A manifest says "this is a restorable set",
/// so every condition is checked against what is observed, the repository included:
/// - the session Succeeded;
/// - it has targets (the batch's members at its start), none twice, each Succeeded;
/// - every target has as many Succeeded hosts as it needed, each with a snapshot id;
/// - each of those snapshots is in the repository, tagged with this session and namespace.
pub(crate) fn manifest_of(
    session: &BackupSession,
    batch: &str,
    repository: &[Snapshot],
    end_time: Timestamp,
) -> Result<Manifest, String> {
    let name = session.name_any();
    let namespace = session.namespace().unwrap_or_default();
    let status = session.status.as_ref().ok_or("the session has no status")?;
    if status.phase != Some(BackupSessionPhase::Succeeded) {
        return Err(format!("the session did not succeed (phase {:?})", status.phase));
    }
    if status.targets.is_empty() {
        return Err("the session backed up no member".into());
    }
    let mut members = Vec::with_capacity(status.targets.len());
    let mut seen = BTreeSet::new();
    for target in &status.targets {
        let what = format!("{} {}", target.reference.kind, target.reference.name);
        if !seen.insert((&target.reference.kind, &target.reference.name)) {
            return Err(format!("{what} appears twice among the session's targets"));
        }
        if target.phase != Some(TargetPhase::Succeeded) {
            return Err(format!("{what} did not succeed"));
        }
        let needed = usize::try_from(target.total_hosts.unwrap_or(1).max(1)).unwrap_or(1);
        let mut hosts = Vec::with_capacity(target.stats.len());
        let mut hostnames = BTreeSet::new();
        for host in &target.stats {
            let snapshot = host.snapshots.first().filter(|s| !s.name.is_empty());
            let (Some(HostPhase::Succeeded), Some(snapshot)) = (host.phase, snapshot) else {
                return Err(format!("host {} of {what} has no successful snapshot", host.hostname));
            };
            let stored = repository.iter().find(|s| s.id == snapshot.name || s.short_id == snapshot.name);
            let belongs = stored.is_some_and(|s| {
                s.tag("session") == Some(name.as_str()) && s.tag(NAMESPACE_TAG) == Some(namespace.as_str())
            });
            if !belongs {
                return Err(format!(
                    "snapshot {} of host {} of {what} is not in the repository with this session's tags",
                    snapshot.name, host.hostname
                ));
            }
            hostnames.insert(host.hostname.as_str());
            hosts.push(ManifestHost {
                hostname: host.hostname.clone(),
                snapshot: snapshot.name.clone(),
                total_size: snapshot.total_size.clone(),
                uploaded: snapshot.uploaded.clone(),
            });
        }
        if hostnames.len() < needed {
            return Err(format!("{what} has {} of its {needed} hosts", hostnames.len()));
        }
        members.push(ManifestMember {
            kind: target.reference.kind.clone(),
            name: target.reference.name.clone(),
            hosts,
        });
    }
    Ok(Manifest {
        version: 1,
        session: name,
        batch: batch.to_string(),
        namespace,
        start_time: session.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        end_time: end_time.to_string(),
        members,
    })
}

/// What retention observed for one batch of one namespace.
pub(crate) struct Observed<'a> {
    pub namespace: &'a str,
    pub batch: &'a str,
    /// The repository's snapshots (any namespace and batch), listed before `unsettled` was read:
    /// a session that starts after that read cannot have written any of them.
    pub snapshots: &'a [Snapshot],
    /// Sessions whose manifests the user's keep rules keep (restic's own policy evaluation).
    pub kept_by_policy: &'a BTreeSet<String>,
    /// Sessions of the batch that exist and are not finalized yet: running, or final with no
    /// manifest decision. Their data is not ours to judge yet.
    pub unsettled: &'a BTreeSet<String>,
}

/// Which sessions retention keeps, and the snapshot ids it forgets.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub keep: BTreeSet<String>,
    /// Manifests first, then data, to be forgotten in that order (see [`Plan::steps`]).
    pub forget: Vec<String>,
    /// How many of `forget`'s first ids are manifests.
    pub manifests: usize,
}

impl Plan {
    /// The forget in two steps, manifests then data: one `restic forget` deletes its ids in any order,
    /// so a forget cut short (the Lease lost, the Pod evicted) could leave a manifest whose data is
    /// gone; a session loses its manifest before any of its data.
    pub(crate) fn steps(&self) -> [&[String]; 2] {
        let (manifests, data) = self.forget.split_at(self.manifests.min(self.forget.len()));
        [manifests, data]
    }
}

/// Retention by whole sessions. Kept: what the keep rules keep, the newest complete session (by
/// session start: manifests carry the session's start as their time) whatever the rules say, and
/// every unsettled session. Forgotten: every other snapshot of this namespace's batch that names a
/// session. Never touched: other namespaces' or batches' snapshots, legacy untagged ones, and
/// snapshots that name no session.
pub(crate) fn plan(observed: &Observed<'_>) -> Plan {
    let ours: Vec<&Snapshot> = observed
        .snapshots
        .iter()
        .filter(|s| ownership(s, observed.namespace, observed.batch) == Ownership::Ours)
        .collect();
    let manifests: Vec<&Snapshot> = ours.iter().copied().filter(|s| is_manifest(s)).collect();
    let complete: BTreeSet<&str> = manifests.iter().filter_map(|s| s.tag("session")).collect();
    let mut keep: BTreeSet<String> =
        observed.kept_by_policy.iter().filter(|s| complete.contains(s.as_str())).cloned().collect();
    if let Some(newest) = newest_complete(&manifests) {
        keep.insert(newest.to_string());
    }
    keep.extend(observed.unsettled.iter().cloned());
    let (manifests, data): (Vec<&Snapshot>, Vec<&Snapshot>) = ours
        .iter()
        .copied()
        .filter(|s| s.tag("session").is_some_and(|session| !keep.contains(session)))
        .partition(|s| is_manifest(s));
    let forget = manifests.iter().chain(&data).map(|s| s.id.clone()).collect();
    Plan { keep, forget, manifests: manifests.len() }
}

/// The session of the manifest with the latest time (the session's start); ties by session name.
fn newest_complete<'a>(manifests: &[&'a Snapshot]) -> Option<&'a str> {
    manifests.iter().filter_map(|s| Some((s.instant()?, s.tag("session")?))).max().map(|(_, session)| session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackupSessionSpec;
    use crate::api::backup_session::BackupInvokerRef;
    use crate::api::backup_session::{
        BackupSessionStatus, BackupTargetStatus, HostBackupStats, SnapshotStats, TargetPhase,
    };
    use crate::api::common::TargetRef;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const NS: &str = "prod";
    const BATCH: &str = "app";

    fn snapshot(id: &str, time: i64, tags: &[String]) -> Snapshot {
        Snapshot {
            id: id.into(),
            short_id: id.chars().take(8).collect(),
            time: Timestamp::from_second(time).expect("time").to_string(),
            hostname: String::new(),
            tags: tags.to_vec(),
            paths: Vec::new(),
            summary: None,
        }
    }

    fn data_tags(session: &str, namespace: &str) -> Vec<String> {
        vec![format!("session={session}"), format!("batch={BATCH}"), format!("{NAMESPACE_TAG}={namespace}")]
    }

    fn manifest_tags(session: &str, namespace: &str) -> Vec<String> {
        let mut tags = data_tags(session, namespace);
        tags.push(MANIFEST_TAG.into());
        tags
    }

    /// A session with one host per target, each reporting `snapshot-<session>-<target>`.
    fn session(name: &str, phase: BackupSessionPhase, targets: &[(&str, Option<HostPhase>)]) -> BackupSession {
        let mut session = BackupSession::new(
            name,
            BackupSessionSpec {
                invoker: BackupInvokerRef { api_group: String::new(), kind: "BackupBatch".into(), name: BATCH.into() },
                retry_left: None,
            },
        );
        session.metadata.namespace = Some(NS.into());
        let targets = targets
            .iter()
            .map(|(target, host)| BackupTargetStatus {
                reference: TargetRef {
                    kind: "PersistentVolumeClaim".into(),
                    name: (*target).into(),
                    ..Default::default()
                },
                total_hosts: Some(1),
                phase: Some(if *host == Some(HostPhase::Succeeded) {
                    TargetPhase::Succeeded
                } else {
                    TargetPhase::Failed
                }),
                stats: host
                    .iter()
                    .map(|phase| HostBackupStats {
                        hostname: (*target).into(),
                        phase: Some(*phase),
                        snapshots: (*phase == HostPhase::Succeeded)
                            .then(|| SnapshotStats { name: format!("snapshot-{name}-{target}"), ..Default::default() })
                            .into_iter()
                            .collect(),
                        duration: None,
                        error: None,
                    })
                    .collect(),
                pre_backup_actions: Vec::new(),
                post_backup_actions: Vec::new(),
                conditions: Vec::new(),
                progress: Vec::new(),
            })
            .collect();
        session.status = Some(BackupSessionStatus { phase: Some(phase), targets, ..Default::default() });
        session
    }

    fn stored(name: &str, targets: &[&str]) -> Vec<Snapshot> {
        targets.iter().map(|t| snapshot(&format!("snapshot-{name}-{t}"), 1, &data_tags(name, NS))).collect()
    }

    #[test]
    fn only_a_succeeded_session_with_every_snapshot_stored_earns_a_manifest() {
        use BackupSessionPhase::*;
        let now = Timestamp::from_second(100).expect("time");
        let ok = Some(HostPhase::Succeeded);
        let complete = session("s1", Succeeded, &[("a", ok), ("b", ok)]);
        let manifest = manifest_of(&complete, BATCH, &stored("s1", &["a", "b"]), now).expect("complete");
        assert_eq!(manifest.members.len(), 2);
        assert_eq!(manifest.namespace, NS);

        // C1: failed before any member ran — no targets, no manifest.
        let early = session("s2", Failed, &[]);
        assert!(manifest_of(&early, BATCH, &[], now).is_err());
        let empty_but_succeeded = session("s2", Succeeded, &[]);
        assert!(manifest_of(&empty_but_succeeded, BATCH, &[], now).unwrap_err().contains("no member"));
        // A failed host, a missing host, a snapshot not in the repository, another namespace's copy.
        let late = session("s3", Failed, &[("a", ok), ("b", Some(HostPhase::Failed))]);
        assert!(manifest_of(&late, BATCH, &stored("s3", &["a"]), now).is_err());
        let missing_host = session("s4", Succeeded, &[("a", None)]);
        assert!(manifest_of(&missing_host, BATCH, &[], now).is_err());
        assert!(
            manifest_of(&complete, BATCH, &stored("s1", &["a"]), now).unwrap_err().contains("not in the repository")
        );
        let elsewhere: Vec<Snapshot> =
            ["a", "b"].iter().map(|t| snapshot(&format!("snapshot-s1-{t}"), 1, &data_tags("s1", "staging"))).collect();
        assert!(manifest_of(&complete, BATCH, &elsewhere, now).is_err());
        let twice = session("s5", Succeeded, &[("a", ok), ("a", ok)]);
        assert!(manifest_of(&twice, BATCH, &stored("s5", &["a"]), now).unwrap_err().contains("twice"));
    }

    #[test]
    fn retention_keeps_the_newest_complete_session_and_unsettled_ones() {
        let mut snapshots = vec![
            snapshot("m1", 10, &manifest_tags("s1", NS)),
            snapshot("d1", 10, &data_tags("s1", NS)),
            snapshot("m2", 20, &manifest_tags("s2", NS)),
            snapshot("d2", 20, &data_tags("s2", NS)),
            snapshot("d3", 30, &data_tags("s3", NS)),
        ];
        let none = BTreeSet::new();
        // keepTags-only rules keep no manifest: the newest complete one is kept all the same (M4).
        let observed =
            Observed { namespace: NS, batch: BATCH, snapshots: &snapshots, kept_by_policy: &none, unsettled: &none };
        assert_eq!(plan(&observed).forget, ["m1", "d1", "d3"]);
        // s3 is still running: untouched (C2).
        let running = BTreeSet::from(["s3".to_string()]);
        let observed = Observed { unsettled: &running, ..observed };
        assert_eq!(plan(&observed).forget, ["m1", "d1"]);
        // Another namespace's same-named batch, legacy snapshots and session-less ones: untouched (H2).
        snapshots.push(snapshot("other", 40, &manifest_tags("s9", "staging")));
        snapshots.push(snapshot("legacy", 1, &[format!("batch={BATCH}"), "session=s0".into()]));
        snapshots.push(snapshot("loose", 1, &[format!("batch={BATCH}"), format!("{NAMESPACE_TAG}={NS}")]));
        let observed =
            Observed { namespace: NS, batch: BATCH, snapshots: &snapshots, kept_by_policy: &none, unsettled: &running };
        assert_eq!(plan(&observed).forget, ["m1", "d1"]);
    }

    /// Newest by session start, not by when finalize wrote the manifest.
    #[test]
    fn newest_is_by_session_start() {
        let snapshots =
            [snapshot("late-written", 10, &manifest_tags("old", NS)), snapshot("new", 20, &manifest_tags("new", NS))];
        let refs: Vec<&Snapshot> = snapshots.iter().collect();
        assert_eq!(newest_complete(&refs), Some("new"));
    }

    /// How one simulated session ends.
    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Succeeded,
        FailedEarly,
        FailedLate,
        Skipped,
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            4 => Just(Outcome::Succeeded),
            1 => Just(Outcome::FailedEarly),
            2 => Just(Outcome::FailedLate),
            1 => Just(Outcome::Skipped),
        ]
    }

    /// A random history: sessions start in order; each ends and is finalized later, interleaved at
    /// random with the others (`order` ranks the end and finalize events). At every finalize the keep
    /// rules keep an arbitrary subset of the manifests (`policy` bits).
    /// `cuts`: how each finalize's forget would be cut short (which step, which of its ids gone).
    fn history() -> impl Strategy<Value = (Vec<Outcome>, Vec<u32>, Vec<u64>, Vec<u64>)> {
        (1usize..8).prop_flat_map(|n| {
            (
                proptest::collection::vec(outcome(), n),
                proptest::collection::vec(any::<u32>(), 3 * n),
                proptest::collection::vec(any::<u64>(), n),
                proptest::collection::vec(any::<u64>(), n),
            )
        })
    }

    /// Every manifest in `repository` has the snapshots of both its targets.
    fn manifests_are_whole(repository: &[Snapshot], targets: &[&str]) -> Result<(), TestCaseError> {
        for manifest in repository.iter().filter(|s| is_manifest(s)) {
            let session = manifest.tag("session").expect("tagged");
            for target in targets {
                let id = format!("snapshot-{session}-{target}");
                prop_assert!(repository.iter().any(|s| s.id == id), "manifest of {session} without {id}");
            }
        }
        Ok(())
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Event {
        Start(usize),
        End(usize),
        Finalize(usize),
    }

    /// Orders the events: a session's start < end < finalize, starts in session order.
    fn schedule(n: usize, ranks: &[u32]) -> Vec<Event> {
        let mut pending: Vec<Vec<Event>> =
            (0..n).map(|i| vec![Event::Finalize(i), Event::End(i), Event::Start(i)]).collect();
        let mut started = 0;
        let mut events = Vec::new();
        for rank in ranks.iter().cycle().take(3 * n * 4) {
            let ready: Vec<usize> = (0..n)
                .filter(|&i| match pending[i].last() {
                    Some(Event::Start(_)) => i == started,
                    Some(_) => true,
                    None => false,
                })
                .collect();
            let Some(&pick) = ready.get(*rank as usize % ready.len().max(1)) else { break };
            let event = pending[pick].pop().expect("ready has an event");
            if matches!(event, Event::Start(_)) {
                started += 1;
            }
            events.push(event);
        }
        for stack in &mut pending {
            while let Some(event) = stack.pop() {
                events.push(event);
            }
        }
        events
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// After every finalize, in any order, whatever the keep rules: every kept manifest's snapshots
        /// exist, the newest finalized complete session is kept whole, and no unsettled session lost
        /// data; no failed, skipped or empty session ever has a manifest. A finalize whose forget is
        /// cut short at any point (then run again) leaves no manifest without its data either.
        #[test]
        fn random_histories_never_lose_the_newest_complete_set((outcomes, ranks, policies, cuts) in history()) {
            let n = outcomes.len();
            let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let targets = ["a", "b"];
            let mut repository: Vec<Snapshot> = Vec::new();
            let mut phase: BTreeMap<usize, BackupSessionPhase> = BTreeMap::new();
            let mut finalized: BTreeSet<usize> = BTreeSet::new();
            for event in schedule(n, &ranks) {
                match event {
                    Event::Start(i) => {
                        phase.insert(i, BackupSessionPhase::Running);
                        // Hosts write their data as the session runs (a late failure writes some of it).
                        let written: &[&str] = match outcomes[i] {
                            Outcome::Succeeded => &targets,
                            Outcome::FailedLate => &targets[..1],
                            Outcome::FailedEarly | Outcome::Skipped => &[],
                        };
                        repository.extend(stored(&names[i], written).into_iter().map(|mut s| {
                            s.time = Timestamp::from_second(i as i64 * 60).expect("time").to_string();
                            s
                        }));
                    }
                    Event::End(i) => {
                        phase.insert(i, match outcomes[i] {
                            Outcome::Succeeded => BackupSessionPhase::Succeeded,
                            Outcome::Skipped => BackupSessionPhase::Skipped,
                            _ => BackupSessionPhase::Failed,
                        });
                    }
                    Event::Finalize(i) => {
                        if matches!(outcomes[i], Outcome::Skipped) {
                            finalized.insert(i);
                            continue;
                        }
                        let ok = Some(HostPhase::Succeeded);
                        let observed_session = match outcomes[i] {
                            Outcome::Succeeded => session(&names[i], BackupSessionPhase::Succeeded, &[("a", ok), ("b", ok)]),
                            Outcome::FailedLate => session(&names[i], BackupSessionPhase::Failed, &[("a", ok), ("b", Some(HostPhase::Failed))]),
                            _ => session(&names[i], BackupSessionPhase::Failed, &[]),
                        };
                        let now = Timestamp::from_second(10_000).expect("time");
                        if let Ok(manifest) = manifest_of(&observed_session, BATCH, &repository, now) {
                            prop_assert!(matches!(outcomes[i], Outcome::Succeeded));
                            let start = i as i64 * 60;
                            repository.push(snapshot(&format!("manifest-{}", manifest.session), start, &manifest_tags(&names[i], NS)));
                        }
                        let manifests: Vec<String> = repository.iter().filter(|s| is_manifest(s)).filter_map(|s| s.tag("session").map(str::to_string)).collect();
                        let kept_by_policy: BTreeSet<String> = manifests.iter().enumerate().filter(|(k, _)| policies[i] >> (k % 64) & 1 == 1).map(|(_, s)| s.clone()).collect();
                        let unsettled: BTreeSet<String> = phase.keys().filter(|&&j| j != i && !finalized.contains(&j)).map(|&j| names[j].clone()).collect();
                        let decided = plan(&Observed { namespace: NS, batch: BATCH, snapshots: &repository, kept_by_policy: &kept_by_policy, unsettled: &unsettled });
                        // Cut short: the steps before the cut done, any of the cut step's ids gone.
                        let [manifests_step, data_step] = decided.steps();
                        let (done, cut_step): (&[String], _) = if cuts[i] & 1 == 0 { (&[], manifests_step) } else { (manifests_step, data_step) };
                        let gone: Vec<&String> = cut_step.iter().enumerate().filter(|(k, _)| cuts[i] >> (1 + k % 63) & 1 == 1).map(|(_, id)| id).collect();
                        let mut cut = repository.clone();
                        cut.retain(|s| !done.contains(&s.id) && !gone.contains(&&s.id));
                        manifests_are_whole(&cut, &targets)?;

                        repository.retain(|s| !decided.forget.contains(&s.id));
                        finalized.insert(i);
                        manifests_are_whole(&repository, &targets)?;
                        let newest = finalized.iter().copied().filter(|&j| matches!(outcomes[j], Outcome::Succeeded)).max();
                        if let Some(j) = newest {
                            prop_assert!(repository.iter().any(|s| is_manifest(s) && s.tag("session") == Some(names[j].as_str())), "newest complete {} lost", names[j]);
                        }
                        for j in phase.keys().filter(|j| !finalized.contains(j)) {
                            let written = match outcomes[*j] { Outcome::Succeeded => 2, Outcome::FailedLate => 1, _ => 0 };
                            let left = repository.iter().filter(|s| !is_manifest(s) && s.tag("session") == Some(names[*j].as_str())).count();
                            prop_assert_eq!(left, written, "unsettled {} lost data", names[*j]);
                        }
                    }
                }
            }
        }
    }
}
