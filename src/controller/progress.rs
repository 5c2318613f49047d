//! How a running session moves on: targets finish when every host reported, and start in order.

use crate::api::backup_session::{BackupSessionStatus, BackupTargetStatus, HostPhase, TargetPhase};
use crate::api::common::ExecutionOrder;
use crate::api::common::{Condition, ConditionStatus};
use crate::conditions::Desired;
use k8s_openapi::jiff::Timestamp;
use std::time::Duration;

/// Where the session stands after [`advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Running,
    Finished { succeeded: bool },
}

fn is_final(phase: Option<TargetPhase>) -> bool {
    matches!(phase, Some(TargetPhase::Succeeded | TargetPhase::Failed))
}

/// Marks started targets whose host entries reached `totalHosts` as Succeeded or Failed, then lets the
/// next targets start: all at once (Parallel) or the first unfinished one (Sequential). A finished
/// target keeps no live progress (a host that crashed mid-backup leaves its last sample behind).
pub fn advance(targets: &mut [BackupTargetStatus], order: ExecutionOrder) -> Progress {
    for target in targets.iter_mut().filter(|t| t.phase == Some(TargetPhase::Running)) {
        let hosts = usize::try_from(target.total_hosts.unwrap_or(1).max(1)).unwrap_or(1);
        if target.stats.len() >= hosts {
            let all_ok = target.stats.iter().all(|s| s.phase == Some(HostPhase::Succeeded));
            target.phase = Some(if all_ok { TargetPhase::Succeeded } else { TargetPhase::Failed });
        }
    }
    for target in targets.iter_mut().filter(|t| is_final(t.phase)) {
        target.progress.clear();
    }
    match order {
        ExecutionOrder::Parallel => {
            for target in targets.iter_mut().filter(|t| !is_final(t.phase)) {
                target.phase = Some(TargetPhase::Running);
            }
        }
        ExecutionOrder::Sequential => {
            if let Some(next) = targets.iter_mut().find(|t| !is_final(t.phase)) {
                next.phase = Some(TargetPhase::Running);
            }
        }
    }
    if targets.iter().all(|t| is_final(t.phase)) {
        Progress::Finished { succeeded: targets.iter().all(|t| t.phase == Some(TargetPhase::Succeeded)) }
    } else {
        Progress::Running
    }
}

/// The running hosts whose progress has not moved for `stall_after`, and when a host that still
/// moves would count as stalled if it stopped now (the next look).
#[derive(Debug, Default, PartialEq)]
pub struct Stall {
    /// `Deployment/app host app-0: no progress since <time>`.
    pub hosts: Vec<String>,
    pub look_again: Option<Duration>,
}

/// The session condition, True while a running host's progress has stood still for `--stall-after`.
pub const STALLED: &str = "Stalled";

impl Stall {
    /// The `Stalled` condition to set: True naming the hosts; False once none is, including when the
    /// last ones finished before their next sample; nothing for a session that never stalled.
    pub fn condition(&self, said_before: bool) -> Option<Desired> {
        if !self.hosts.is_empty() {
            Some(Desired::new(STALLED, true, "NoProgress", self.hosts.join("; ")))
        } else {
            said_before.then(|| Desired::new(STALLED, false, "NoneStalled", "no running host is stalled"))
        }
    }
}

/// The session's `Stalled` condition, when True (for Events and `describe`).
pub fn stalled_condition(status: Option<&BackupSessionStatus>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == STALLED && c.status == ConditionStatus::True)
}

pub fn stalled(targets: &[BackupTargetStatus], now: Timestamp, stall_after: Duration) -> Stall {
    let mut stall = Stall::default();
    for target in targets.iter().filter(|t| t.phase == Some(TargetPhase::Running)) {
        for host in &target.progress {
            let quiet = Duration::try_from(now.duration_since(host.last_change.0)).unwrap_or(Duration::ZERO);
            match stall_after.checked_sub(quiet) {
                Some(left) if !left.is_zero() => {
                    stall.look_again = Some(stall.look_again.map_or(left, |other| other.min(left)));
                }
                _ => stall.hosts.push(format!(
                    "{}/{} host {}: no progress since {} ({}%)",
                    target.reference.kind, target.reference.name, host.hostname, host.last_change.0, host.percent
                )),
            }
        }
    }
    stall
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::backup_session::{HostBackupStats, HostProgress};
    use crate::api::common::TargetRef;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn target(name: &str, hosts: i32) -> BackupTargetStatus {
        BackupTargetStatus {
            reference: TargetRef { kind: "StatefulSet".into(), name: name.into(), ..Default::default() },
            total_hosts: Some(hosts),
            phase: Some(TargetPhase::Pending),
            stats: Vec::new(),
            pre_backup_actions: Vec::new(),
            post_backup_actions: Vec::new(),
            conditions: Vec::new(),
            progress: Vec::new(),
        }
    }

    fn host(name: &str, phase: HostPhase) -> HostBackupStats {
        HostBackupStats {
            hostname: name.into(),
            phase: Some(phase),
            snapshots: Vec::new(),
            duration: None,
            error: None,
        }
    }

    #[test]
    fn a_target_finishes_only_when_every_host_reported() {
        let mut targets = vec![target("db", 2)];
        assert_eq!(advance(&mut targets, ExecutionOrder::Parallel), Progress::Running);
        targets[0].stats.push(host("db-0", HostPhase::Succeeded));
        assert_eq!(advance(&mut targets, ExecutionOrder::Parallel), Progress::Running);
        assert_eq!(targets[0].phase, Some(TargetPhase::Running));
        targets[0].stats.push(host("db-1", HostPhase::Failed));
        assert_eq!(advance(&mut targets, ExecutionOrder::Parallel), Progress::Finished { succeeded: false });
        assert_eq!(targets[0].phase, Some(TargetPhase::Failed));
    }

    #[test]
    fn sequential_targets_start_one_after_another() {
        let mut targets = vec![target("a", 1), target("b", 1), target("c", 1)];
        advance(&mut targets, ExecutionOrder::Sequential);
        let phases = |t: &[BackupTargetStatus]| t.iter().map(|t| t.phase).collect::<Vec<_>>();
        use TargetPhase::*;
        assert_eq!(phases(&targets), [Some(Running), Some(Pending), Some(Pending)]);
        targets[0].stats.push(host("a", HostPhase::Failed));
        advance(&mut targets, ExecutionOrder::Sequential);
        assert_eq!(
            phases(&targets),
            [Some(Failed), Some(Running), Some(Pending)],
            "a failed member does not stop the rest"
        );
        targets[1].stats.push(host("b", HostPhase::Succeeded));
        targets[2].stats.push(host("c", HostPhase::Succeeded));
        assert_eq!(advance(&mut targets, ExecutionOrder::Sequential), Progress::Running, "c only now starts");
        assert_eq!(advance(&mut targets, ExecutionOrder::Sequential), Progress::Finished { succeeded: false });
    }

    #[test]
    fn parallel_targets_all_start_and_succeed_together() {
        let mut targets = vec![target("a", 1), target("b", 1)];
        advance(&mut targets, ExecutionOrder::Parallel);
        assert!(targets.iter().all(|t| t.phase == Some(TargetPhase::Running)));
        targets[0].stats.push(host("a", HostPhase::Succeeded));
        targets[1].stats.push(host("b", HostPhase::Succeeded));
        assert_eq!(advance(&mut targets, ExecutionOrder::Parallel), Progress::Finished { succeeded: true });
    }

    fn moving(name: &str, last_change: i64) -> HostProgress {
        HostProgress {
            hostname: name.into(),
            percent: 40,
            bytes_done: 4,
            total_bytes: 10,
            files_done: 1,
            total_files: 2,
            seconds_remaining: None,
            last_change: Time(Timestamp::from_second(last_change).expect("time")),
        }
    }

    #[test]
    fn a_host_is_stalled_once_its_numbers_stood_still_for_the_limit() {
        let mut targets = vec![target("a", 2), target("b", 1)];
        advance(&mut targets, ExecutionOrder::Parallel);
        targets[0].progress = vec![moving("a-0", 1_000), moving("a-1", 1_030)];
        let at = |second| Timestamp::from_second(second).expect("time");
        let limit = Duration::from_secs(60);
        assert_eq!(stalled(&targets, at(1_000), limit), Stall { hosts: vec![], look_again: Some(limit) });
        let almost = stalled(&targets, at(1_059), limit);
        assert_eq!((almost.hosts.len(), almost.look_again), (0, Some(Duration::from_secs(1))));
        let one = stalled(&targets, at(1_060), limit);
        assert_eq!(one.hosts.len(), 1, "exactly at the limit counts");
        assert!(one.hosts[0].starts_with("StatefulSet/a host a-0: no progress since"), "{:?}", one.hosts);
        assert_eq!(one.look_again, Some(Duration::from_secs(30)), "a-1 may still stall");
        // A clock behind the host's (another node) never counts as stalled.
        assert_eq!(stalled(&targets, at(900), limit).hosts.len(), 0);
    }

    #[test]
    fn a_finished_target_keeps_no_live_progress_and_is_never_stalled() {
        let mut targets = vec![target("a", 1)];
        advance(&mut targets, ExecutionOrder::Parallel);
        targets[0].progress = vec![moving("a", 0)];
        targets[0].stats.push(host("a", HostPhase::Failed));
        advance(&mut targets, ExecutionOrder::Parallel);
        assert!(targets[0].progress.is_empty());
        targets[0].progress = vec![moving("a", 0)];
        let late = Timestamp::from_second(100_000).expect("time");
        let stall = stalled(&targets, late, Duration::from_secs(1));
        assert_eq!(stall, Stall::default());
        assert!(!stall.condition(true).expect("said False once it was True").is_true());
        assert_eq!(stall.condition(false), None, "never stalled, never said");
    }
}
