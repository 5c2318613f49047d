//! A Go-style duration string (`30s`, `10m`, `1h30m`) kept exactly as the user wrote it.
//!
//! Parsing is deferred to the consumer so that an odd stored value can never make a whole object
//! undeserializable (which would stall a watch); the schema's CEL rule refuses bad values at apply time.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

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
    pub fn parse(&self) -> Result<std::time::Duration, kube::core::duration::ParseError> {
        let parsed: kube::core::Duration = self.0.parse()?;
        Ok(parsed.into())
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
        assert!(DurationString::new("soon").parse().is_err());
    }
}
