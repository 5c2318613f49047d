//! BackupBatch members by the workload they target, so that admission does two hash lookups instead
//! of scanning every cached batch. Rebuilt from the batch cache only after it changed.

use super::decision::Workload;
use crate::api::BackupBatch;
use crate::workload::WorkloadKind;
use arc_swap::ArcSwap;
use kube::runtime::reflector::Store;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
struct Candidate {
    kind: WorkloadKind,
    batch: Arc<BackupBatch>,
    member: usize,
}

/// namespace → workload name → members targeting a workload of that name, by batch name.
#[derive(Default)]
struct Built {
    generation: u64,
    by_namespace: HashMap<String, HashMap<String, Vec<Candidate>>>,
}

impl Built {
    fn from(generation: u64, batches: Vec<Arc<BackupBatch>>) -> Self {
        let mut by_namespace: HashMap<String, HashMap<String, Vec<Candidate>>> = HashMap::new();
        for batch in batches.into_iter().filter(|b| b.metadata.deletion_timestamp.is_none()) {
            let Some(namespace) = batch.metadata.namespace.clone() else { continue };
            for (member, spec) in batch.spec.members.iter().enumerate() {
                let reference = &spec.target.reference;
                let Some(kind) = WorkloadKind::parse(&reference.kind) else { continue };
                let group = reference.api_version.split_once('/').map_or("", |(group, _)| group);
                let same_group = reference.api_version.is_empty() || group == kind.group();
                // Sidecars only go to Pods in the batch's own namespace.
                let same_namespace = reference.namespace.as_deref().is_none_or(|ns| ns == namespace);
                if same_group && same_namespace {
                    let candidate = Candidate { kind, batch: batch.clone(), member };
                    by_namespace
                        .entry(namespace.clone())
                        .or_default()
                        .entry(reference.name.clone())
                        .or_default()
                        .push(candidate);
                }
            }
        }
        // When several batches claim a workload (the controller reports it), every webhook replica
        // picks the same one: the smallest batch name.
        for candidates in by_namespace.values_mut().flat_map(HashMap::values_mut) {
            candidates.sort_by(|a, b| a.batch.metadata.name.cmp(&b.batch.metadata.name));
        }
        Self { generation, by_namespace }
    }
}

pub struct TargetIndex {
    /// Bumped on every change of the batch cache.
    generation: AtomicU64,
    built: ArcSwap<Built>,
    rebuilding: Mutex<()>,
}

impl Default for TargetIndex {
    fn default() -> Self {
        Self {
            generation: AtomicU64::new(1),
            built: ArcSwap::from_pointee(Built::default()),
            rebuilding: Mutex::new(()),
        }
    }
}

impl TargetIndex {
    /// Marks the index stale; the next lookup rebuilds it.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The member of a batch in `namespace` that targets `workload`.
    pub fn lookup(
        &self,
        batches: &Store<BackupBatch>,
        namespace: &str,
        workload: &Workload,
    ) -> Option<(Arc<BackupBatch>, usize)> {
        let built = self.current(batches);
        let candidates = built.by_namespace.get(namespace)?.get(&workload.name)?;
        let found = candidates.iter().find(|c| c.kind == workload.kind)?;
        Some((found.batch.clone(), found.member))
    }

    fn current(&self, batches: &Store<BackupBatch>) -> Arc<Built> {
        let wanted = self.generation.load(Ordering::Acquire);
        let built = self.built.load_full();
        if built.generation == wanted {
            return built;
        }
        let _one_rebuild_at_a_time = self.rebuilding.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let built = self.built.load_full();
        if built.generation == wanted {
            return built;
        }
        let fresh = Arc::new(Built::from(wanted, batches.state()));
        self.built.store(fresh.clone());
        fresh
    }
}
