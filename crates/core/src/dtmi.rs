//! Digital Twin Model Identifiers (`dtmi:com:example:Thermostat;1`).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest DTMI the language accepts (DTDL v3 "Limits").
pub const MAX_DTMI_LEN: usize = 2048;

/// A syntactically valid DTMI. Cheap to clone; compared as written (DTMIs are case-sensitive).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dtmi(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid DTMI: {0}")]
pub struct InvalidDtmi(pub String);

impl Dtmi {
    /// Parses `dtmi:<segment>(:<segment>)*[;<major>[.<minor>]]`.
    ///
    /// A segment starts with a letter, holds letters, digits and underscores, and does not end
    /// with an underscore. The major version is 1 to 9 digits without a leading zero; DTDL v3 adds
    /// an optional minor version of up to 6 digits.
    pub fn parse(s: &str) -> Result<Self, InvalidDtmi> {
        if is_valid_dtmi(s) {
            Ok(Self(Arc::from(s)))
        } else {
            Err(InvalidDtmi(truncate_for_message(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before `;`, i.e. the identifier without its version.
    pub fn unversioned(&self) -> &str {
        self.0.split(';').next().unwrap_or(&self.0)
    }

    /// The major version, if the DTMI has one.
    pub fn major_version(&self) -> Option<u32> {
        let (_, version) = self.0.split_once(';')?;
        version.split('.').next()?.parse().ok()
    }
}

fn truncate_for_message(s: &str) -> String {
    s.chars().take(128).collect()
}

fn is_valid_dtmi(s: &str) -> bool {
    if s.len() > MAX_DTMI_LEN {
        return false;
    }
    let Some(rest) = s.strip_prefix("dtmi:") else {
        return false;
    };
    let (path, version) = match rest.split_once(';') {
        Some((path, version)) => (path, Some(version)),
        None => (rest, None),
    };
    if !path.split(':').all(is_valid_segment) {
        return false;
    }
    match version {
        None => true,
        Some(v) => {
            let (major, minor) = match v.split_once('.') {
                Some((major, minor)) => (major, Some(minor)),
                None => (v, None),
            };
            is_version_number(major, 9) && minor.is_none_or(|m| is_version_number(m, 6))
        }
    }
}

fn is_valid_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphabetic()
                && *last != b'_'
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
        }
        _ => false,
    }
}

fn is_version_number(s: &str, max_digits: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_digits
        && !s.starts_with('0')
        && s.bytes().all(|b| b.is_ascii_digit())
}

impl fmt::Display for Dtmi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Dtmi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dtmi({})", self.0)
    }
}

impl Serialize for Dtmi {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Dtmi {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Dtmi::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_versioned_and_unversioned_identifiers() {
        for ok in [
            "dtmi:com:example:Thermostat;1",
            "dtmi:a;1.2",
            "dtmi:a_b:c1",
            "dtmi:x;999999999",
        ] {
            assert!(Dtmi::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_malformed_identifiers() {
        for bad in [
            "",
            "dtmi:",
            "urn:a;1",
            "dtmi:1a;1",
            "dtmi:a_;1",
            "dtmi:a;0",
            "dtmi:a;01",
            "dtmi:a;1.",
            "dtmi:a;1.0",
            "dtmi:a::b;1",
            "dtmi:a-b;1",
            "dtmi:a;1234567890",
        ] {
            assert!(Dtmi::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exposes_version_and_unversioned_id() {
        let d = Dtmi::parse("dtmi:com:example:Room;12").unwrap();
        assert_eq!(d.major_version(), Some(12));
        assert_eq!(d.unversioned(), "dtmi:com:example:Room");
    }
}
