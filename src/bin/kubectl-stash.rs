//! `kubectl-stash`: the `stash` program itself, built under the file name kubectl looks for on
//! PATH. It tells from that name that it runs as the plugin and offers the user's verbs alone.

#[path = "../main.rs"]
mod stash_main;

fn main() -> std::process::ExitCode {
    stash_main::main()
}
