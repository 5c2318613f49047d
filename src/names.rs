//! Names and label values that fit Kubernetes' limits however long the user's names are: kept as
//! they are when they fit, else cut and suffixed with a hash of the whole, so that distinct inputs
//! stay distinct and the same input always gives the same result.

/// The longest label value the API server accepts.
pub const LABEL_VALUE_MAX: usize = 63;

/// `name` if it has at most `max` bytes, else its first bytes, `-`, and 8 hex digits of its hash.
pub fn bounded(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let digest = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let room = max.saturating_sub(9);
    let cut = name.char_indices().map(|(i, _)| i).take_while(|&i| i <= room).last().unwrap_or(0);
    let kept = name[..cut].trim_end_matches(['-', '.', '_']);
    format!("{kept}-{:08x}", digest as u32)
}

/// The longest object name the API server accepts.
pub(crate) const NAME_MAX: usize = 253;

/// A label value naming `name` (a batch, session or restore).
pub fn label_value(name: &str) -> String {
    bounded(name, LABEL_VALUE_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_and_hashed_short_ones_kept() {
        assert_eq!(label_value("app-backup-1764043200"), "app-backup-1764043200");
        let long = format!("{}-1764043200", "a".repeat(63));
        let value = label_value(&long);
        assert!(value.len() <= LABEL_VALUE_MAX, "{value}");
        assert_ne!(value, label_value(&format!("{}-1764043201", "a".repeat(63))), "distinct inputs stay distinct");
        assert_eq!(value, label_value(&long), "stable");
        let dashes = format!("{}-{}", "b".repeat(42), "c".repeat(30));
        assert!(bounded(&dashes, 52).chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric()));
        assert!(bounded(&dashes, 52).len() <= 52);
    }
}
