//! How a running session moves on: targets finish when every host reported, and start in order.

use crate::api::backup_session::{BackupTargetStatus, HostPhase, TargetPhase};
use crate::api::common::ExecutionOrder;

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
/// next targets start: all at once (Parallel) or the first unfinished one (Sequential).
pub fn advance(targets: &mut [BackupTargetStatus], order: ExecutionOrder) -> Progress {
    for target in targets.iter_mut().filter(|t| t.phase == Some(TargetPhase::Running)) {
        let hosts = usize::try_from(target.total_hosts.unwrap_or(1).max(1)).unwrap_or(1);
        if target.stats.len() >= hosts {
            let all_ok = target.stats.iter().all(|s| s.phase == Some(HostPhase::Succeeded));
            target.phase = Some(if all_ok { TargetPhase::Succeeded } else { TargetPhase::Failed });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::backup_session::HostBackupStats;
    use crate::api::common::TargetRef;

    fn target(name: &str, hosts: i32) -> BackupTargetStatus {
        BackupTargetStatus {
            reference: TargetRef { kind: "StatefulSet".into(), name: name.into(), ..Default::default() },
            total_hosts: Some(hosts),
            phase: Some(TargetPhase::Pending),
            stats: Vec::new(),
            pre_backup_actions: Vec::new(),
            post_backup_actions: Vec::new(),
            conditions: Vec::new(),
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
}
