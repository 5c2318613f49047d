//! Quantities as statuses write them in text (`12.5 MiB`, see `agent::status::human_bytes`), read back.

/// `12.5 MiB` → bytes.
pub(crate) fn parse_bytes(text: &str) -> Option<u64> {
    let (number, unit) = text.split_once(' ')?;
    let power = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"].iter().position(|u| *u == unit)?;
    let value: f64 = number.parse().ok()?;
    Some((value * 1024f64.powi(i32::try_from(power).ok()?)) as u64)
}
