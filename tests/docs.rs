//! The documentation's links lead somewhere: every relative link in README.md and docs/**/*.md names a
//! file or directory that exists, and every `#anchor` into a Markdown file names one of its headings
//! (as GitHub spells heading anchors). Needs no cluster.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/, sorted.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                found.push(path);
            }
        }
    }
    let mut files = vec![repo_root().join("README.md")];
    walk(&repo_root().join("docs"), &mut files);
    files.sort();
    files
}

/// The lines of `text` outside fenced code blocks.
fn outside_fences(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
        } else if !fenced {
            lines.push(line);
        }
    }
    lines
}

/// `line` without its `code` spans: a `[0](x)` inside one is no link.
fn without_code_spans(line: &str) -> String {
    line.split('`').step_by(2).collect()
}

/// The targets of the inline links `[text](target)` and images `![alt](target)` of `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in outside_fences(text).into_iter().map(without_code_spans) {
        let mut rest = line.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            // A title (`(file.md "Title")`) follows the target after a space.
            let target = after[..end].split_whitespace().next().unwrap_or_default();
            let target = target.trim_start_matches('<').trim_end_matches('>');
            if !target.is_empty() {
                targets.push(target.to_string());
            }
            rest = &after[end + 1..];
        }
    }
    targets
}

/// A heading's anchor as GitHub makes it: link syntax reduced to its text, lowercase, punctuation
/// other than `-` and `_` dropped, spaces turned into `-`.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[text](target)` → `text`.
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else { break };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else { break };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor the headings of `text` define (repeated headings get `-1`, `-2`, … as on GitHub).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in outside_fences(text) {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim());
        let mut anchor = base.clone();
        let mut n = 0;
        while found.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        found.insert(anchor);
    }
    found
}

/// What is wrong with `target`, a link of `file`, if anything.
fn broken(file: &Path, text: &str, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let (resolved, linked_text) = if path.is_empty() {
        (file.to_path_buf(), text.to_string())
    } else {
        let resolved = file.parent().expect("a file has a directory").join(path);
        if !resolved.exists() {
            return Some(format!("{target} does not exist"));
        }
        let linked =
            if resolved.is_file() { std::fs::read_to_string(&resolved).unwrap_or_default() } else { String::new() };
        (resolved, linked)
    };
    let anchor = anchor.filter(|a| !a.is_empty())?;
    if resolved.extension().is_some_and(|ext| ext == "md") && !anchors(&linked_text).contains(anchor) {
        return Some(format!("{target}: no heading there has the anchor #{anchor}"));
    }
    None
}

#[test]
fn every_relative_link_in_the_docs_leads_to_a_file_and_heading_that_exist() {
    let mut problems = Vec::new();
    let files = markdown_files();
    assert!(files.len() > 1, "README.md and the docs/ tree");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|err| panic!("reading {}: {err}", file.display()));
        for target in link_targets(&text) {
            if let Some(problem) = broken(file, &text, &target) {
                let shown = file.strip_prefix(repo_root()).unwrap_or(file);
                problems.push(format!("{}: {problem}", shown.display()));
            }
        }
    }
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn links_and_anchors_are_read_as_github_renders_them() {
    let text = "# Top\n\nSee [a](a.md) and ![b](img/b.png \"B\").\n\n```sh\n[not](a link)\n```\n\
                Inline `[no](link)` code; [c](#top) and [d](<d.md#x>).\n## API `stash` compatibility\n## Top\n";
    assert_eq!(link_targets(text), ["a.md", "img/b.png", "#top", "d.md#x"]);
    let found = anchors(text);
    for anchor in ["top", "api-stash-compatibility", "top-1"] {
        assert!(found.contains(anchor), "{anchor} in {found:?}");
    }
    assert_eq!(slug("Who may call the webhook"), "who-may-call-the-webhook");
    assert_eq!(slug("Same namespace (in place)"), "same-namespace-in-place");
    assert_eq!(slug("[Testing](#testing) and more"), "testing-and-more");
}
