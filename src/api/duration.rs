//! A Go-style duration string (`30s`, `10m`, `1h30m`) kept exactly as the user wrote it.
//!
//! Parsing is deferred to the consumer so that an odd stored value can never make a whole object
//! undeserializable (which would stall a watch); the schema's CEL rule refuses bad values at apply time.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::Duration;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct DurationString(String);

impl DurationString {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The duration, or why the text is not one.
    pub fn parse(&self) -> Result<Duration, DurationError> {
        parse_go(&self.0)
    }
}

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty")]
    Empty,
    #[error("negative")]
    Negative,
    #[error("expected a number at {0:?}")]
    Number(String),
    #[error("a number without a unit (ns, us, ms, s, m or h)")]
    MissingUnit,
    #[error("unknown unit {0:?} (ns, us, ms, s, m or h)")]
    Unit(String),
    #[error("longer than Go's 2562047h")]
    TooLong,
}

/// Go's `time.ParseDuration` (`1h30m`, `1.5s`, `300ms`) for durations that are not negative, with
/// checked arithmetic: kube's parser panics on a sign inside the text (`1h-5m`) or an overflow, and
/// these texts come from users (annotations, flags). A fraction's digits past the 18th are ignored.
fn parse_go(text: &str) -> Result<Duration, DurationError> {
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(DurationError::Number(rest.to_string()));
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "" => return Err(DurationError::MissingUnit),
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => return Err(DurationError::Unit(other.to_string())),
        };
        // Only digits: a failed parse is a number too large for any duration.
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| DurationError::TooLong)? };
        let fraction = &fraction[..fraction.len().min(18)];
        let tenths: u128 =
            if fraction.is_empty() { 0 } else { fraction.parse().map_err(|_| DurationError::TooLong)? };
        let part = whole
            .checked_mul(per_unit)
            .and_then(|n| n.checked_add(tenths * per_unit / 10u128.pow(fraction.len() as u32)))
            .ok_or(DurationError::TooLong)?;
        nanos = nanos.checked_add(part).filter(|n| *n <= i64::MAX as u128).ok_or(DurationError::TooLong)?;
        rest = after;
    }
    match u64::try_from(nanos) {
        Ok(0) => Ok(Duration::ZERO),
        _ if negative => Err(DurationError::Negative),
        Ok(nanos) => Ok(Duration::from_nanos(nanos)),
        Err(_) => Err(DurationError::TooLong),
    }
}

impl JsonSchema for DurationString {
    fn schema_name() -> Cow<'static, str> {
        "DurationString".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "x-kubernetes-validations": [{
                "rule": "duration(self) >= duration('0s')",
                "message": "must be a non-negative duration such as 30s, 10m or 1h30m"
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_go_durations() {
        assert_eq!(DurationString::new("1h30m").parse(), Ok(Duration::from_secs(5400)));
        assert_eq!(DurationString::new("90s").parse(), Ok(Duration::from_secs(90)));
        assert_eq!(DurationString::new("1.5s").parse(), Ok(Duration::from_millis(1500)));
        assert_eq!(DurationString::new("0").parse(), Ok(Duration::ZERO));
        assert_eq!(DurationString::new("-0s").parse(), Ok(Duration::ZERO));
        assert!(DurationString::new("soon").parse().is_err());
    }

    /// Texts kube's parser panicked on (a finalize reading the check-interval annotation, a CLI
    /// flag) are errors that say what is wrong.
    #[test]
    fn odd_texts_are_errors_not_panics() {
        let parse = |text: &str| DurationString::new(text).parse();
        assert_eq!(parse("1h-5m"), Err(DurationError::Unit("h-".into())), "as Go reads it");
        assert_eq!(parse("1h.m"), Err(DurationError::Number(".m".into())));
        assert_eq!(parse("99999999999999999999h"), Err(DurationError::TooLong));
        assert_eq!(parse("2562048h"), Err(DurationError::TooLong));
        assert_eq!(parse("-1h"), Err(DurationError::Negative));
        assert_eq!(parse("5"), Err(DurationError::MissingUnit));
        assert_eq!(parse("5d"), Err(DurationError::Unit("d".into())));
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("1..5s"), Err(DurationError::Number("1..5s".into())));
    }

    proptest::proptest! {
        /// Any text: a duration or an error, never a panic.
        #[test]
        fn any_text_parses_or_fails(text in ".{0,24}") {
            let _ = DurationString::new(text).parse();
        }

        /// Texts Go writes read as kube's parser reads them.
        #[test]
        fn go_durations_read_as_kube_reads_them(
            parts in proptest::collection::vec((0u64..100_000, 0u32..1000, 0usize..6), 1..4)
        ) {
            let units = ["ns", "us", "ms", "s", "m", "h"];
            let text: String = parts
                .iter()
                .map(|(whole, fraction, unit)| format!("{whole}.{fraction:03}{}", units[*unit]))
                .collect();
            let kube: Duration = text.parse::<kube::core::Duration>().expect("kube reads it").into();
            let ours = DurationString::new(text.as_str()).parse().expect("we read it");
            // kube multiplies in floating point: a nanosecond per part, or 1e-15 of the whole, apart.
            let apart = ours.abs_diff(kube).as_nanos();
            let slack = parts.len() as u128 + kube.as_nanos() / 1_000_000_000_000_000;
            proptest::prop_assert!(apart <= slack, "{text}: {ours:?} vs {kube:?}");
        }
    }
}
