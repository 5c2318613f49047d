//! restic's output read as it arrives, in bounded memory. restic may print millions of lines (a
//! retry per failed request, an error per unreadable file, a status line per second of a long
//! backup); an executor that kept them all would be killed for its memory before it could report.

use std::io;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// How much of stderr is kept: its end, where restic says why it stopped (the `Fatal:` line, the
/// lock holder), from which errors are recognised and quoted.
pub(crate) const STDERR_TAIL: usize = 64 << 10;

/// The largest document kept from stdout. `snapshots --json` of a repository with 100,000 snapshots
/// is about 50 MB; more is a repository (or a restic) to look at, not a reason to grow without end.
pub(crate) const DOCUMENT_LIMIT: usize = 64 << 20;

/// The longest line handed over in `Lines` mode; restic's JSON lines are a few KiB at most.
pub(crate) const LINE_LIMIT: usize = 1 << 20;

/// What the caller keeps of stdout.
pub(crate) enum Stdout<'a> {
    /// Nothing: drained so that restic never blocks on a full pipe.
    Discard,
    /// One document the caller parses whole (`snapshots --json`, a dumped manifest), up to `limit`.
    Document { limit: usize },
    /// Each line as it arrives, dropped once handed over (`backup --json`, `ls --json`).
    Lines(&'a mut (dyn FnMut(&str) + Send)),
}

/// What was read from stdout: the document (empty unless one was asked for), and what went past
/// the mode's limit, if anything did.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    pub(crate) document: String,
    pub(crate) overflow: Option<String>,
}

/// Reads stdout to its end as `mode` says. Everything past a limit is still read (and dropped), so
/// that restic finishes as it would have and its exit status says how it ended.
pub(crate) async fn read_stdout<R: AsyncRead + Unpin>(pipe: R, mode: Stdout<'_>) -> io::Result<Kept> {
    match mode {
        Stdout::Discard => {
            tokio::io::copy(&mut BufReader::new(pipe), &mut tokio::io::sink()).await?;
            Ok(Kept::default())
        }
        Stdout::Document { limit } => read_document(pipe, limit).await,
        Stdout::Lines(on_line) => each_line(pipe, LINE_LIMIT, on_line).await,
    }
}

async fn read_document<R: AsyncRead + Unpin>(mut pipe: R, limit: usize) -> io::Result<Kept> {
    let mut document = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut total = 0usize;
    loop {
        let n = pipe.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        total = total.saturating_add(n);
        if total <= limit {
            document.extend_from_slice(&chunk[..n]);
        } else if !document.is_empty() {
            document = Vec::new();
        }
    }
    let overflow = (total > limit).then(|| format!("more than {} on stdout", human(limit)));
    Ok(Kept { document: String::from_utf8_lossy(&document).into_owned(), overflow })
}

async fn each_line<R: AsyncRead + Unpin>(
    pipe: R,
    limit: usize,
    on_line: &mut (dyn FnMut(&str) + Send),
) -> io::Result<Kept> {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    // The line being read went past `limit`: the rest of it is skipped.
    let mut skipping = false;
    let mut overflow = None;
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            break;
        }
        let newline = buffer.iter().position(|&b| b == b'\n');
        let part = &buffer[..newline.unwrap_or(buffer.len())];
        if !skipping && line.len() + part.len() > limit {
            skipping = true;
            line = Vec::new();
            overflow = Some(format!("a line longer than {} on stdout", human(limit)));
        }
        if !skipping {
            line.extend_from_slice(part);
        }
        let used = newline.map_or(buffer.len(), |at| at + 1);
        if newline.is_some() {
            if !skipping {
                on_line(&String::from_utf8_lossy(&line));
            }
            line.clear();
            skipping = false;
        }
        reader.consume(used);
    }
    if !line.is_empty() && !skipping {
        on_line(&String::from_utf8_lossy(&line));
    }
    Ok(Kept { document: String::new(), overflow })
}

/// Reads a pipe to its end and returns its last `limit` bytes (at most), from the start of a line
/// where an earlier part was dropped: a line cut in two could show half a secret that redaction,
/// which matches whole values, would miss. One line longer than `limit` is kept as its end.
pub(crate) async fn read_tail<R: AsyncRead + Unpin>(mut pipe: R, limit: usize) -> io::Result<String> {
    let mut kept = Vec::new();
    let mut dropped = false;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = pipe.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        // Trimmed in steps of at least `limit` bytes, so each byte is moved a bounded number of times.
        if kept.len() > 2 * limit {
            kept.drain(..kept.len() - limit);
            dropped = true;
        }
    }
    if kept.len() > limit {
        kept.drain(..kept.len() - limit);
        dropped = true;
    }
    if dropped && let Some(newline) = kept.iter().position(|&b| b == b'\n').filter(|&at| at + 1 < kept.len()) {
        kept.drain(..=newline);
    }
    Ok(String::from_utf8_lossy(&kept).into_owned())
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 { format!("{} MiB", bytes >> 20) } else { format!("{} KiB", bytes >> 10) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered_lines(count: usize) -> String {
        (0..count).map(|i| format!("line {i}\n")).collect()
    }

    #[tokio::test]
    async fn the_tail_is_bounded_starts_at_a_line_and_ends_with_the_last_one() {
        let text = numbered_lines(100_000);
        let tail = read_tail(text.as_bytes(), 1000).await.expect("read");
        assert!(tail.len() <= 1000, "{} bytes", tail.len());
        assert!(tail.starts_with("line "), "{tail:?}");
        assert!(tail.ends_with("line 99999\n"), "{tail:?}");
        assert_eq!(read_tail("short\n".as_bytes(), 1000).await.expect("read"), "short\n", "nothing dropped");
    }

    #[tokio::test]
    async fn one_line_longer_than_the_tail_keeps_its_end() {
        let text = format!("{}the end", "x".repeat(10_000));
        let tail = read_tail(text.as_bytes(), 100).await.expect("read");
        assert_eq!(tail.len(), 100);
        assert!(tail.ends_with("the end"));
    }

    #[tokio::test]
    async fn a_document_over_its_limit_is_an_overflow_and_keeps_nothing() {
        let kept = read_stdout("[1,2,3]".as_bytes(), Stdout::Document { limit: 7 }).await.expect("read");
        assert_eq!((kept.document.as_str(), kept.overflow), ("[1,2,3]", None));
        let text = numbered_lines(10_000);
        let kept = read_stdout(text.as_bytes(), Stdout::Document { limit: 2 << 10 }).await.expect("read");
        assert_eq!(kept.document, "");
        assert_eq!(kept.overflow.as_deref(), Some("more than 2 KiB on stdout"));
    }

    #[tokio::test]
    async fn lines_are_handed_over_one_by_one_and_an_overlong_one_is_skipped() {
        let text = format!("first\n{}\nthird\nlast without a newline", "x".repeat(LINE_LIMIT + 1));
        let mut seen = Vec::new();
        let kept =
            read_stdout(text.as_bytes(), Stdout::Lines(&mut |line| seen.push(line.to_string()))).await.expect("read");
        assert_eq!(seen, ["first", "third", "last without a newline"]);
        assert_eq!(kept.overflow.as_deref(), Some("a line longer than 1 MiB on stdout"));
    }
}
