//! The project's shell scripts stop on a failed step. `set -e` cannot see a command substitution that
//! `eval` expands: `eval "$(cluster.sh up)"` evaluates an empty string when `up` fails, and the script goes on
//! without the cluster it was promised (a CI run once skipped every node test that way). Needs no cluster.

use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_script_evaluates_a_command_substitution_whose_failure_it_cannot_see() {
    let listed = Command::new("git").args(["ls-files", "*.sh"]).current_dir(repo_root()).output().expect("git runs");
    assert!(listed.status.success(), "git ls-files: {}", String::from_utf8_lossy(&listed.stderr));
    let scripts = String::from_utf8(listed.stdout).expect("UTF-8 paths");
    assert!(scripts.lines().count() > 5, "the scripts are listed: {scripts}");
    let offending: Vec<String> = scripts
        .lines()
        .flat_map(|script| {
            let text = std::fs::read_to_string(repo_root().join(script)).unwrap_or_else(|e| panic!("{script}: {e}"));
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim_start().starts_with('#') && line.contains("eval \"$("))
                .map(|(n, line)| format!("{script}:{}: {}", n + 1, line.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        offending.is_empty(),
        "assign the output first (`exports=$(cmd)`, which set -e checks), then eval it:\n{}",
        offending.join("\n")
    );
}
