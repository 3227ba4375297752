//! Checks of twin and relationship contents against their compiled DTDL interface.

use serde_json::{Map, Value};

use crate::dtdl::Interface;
use crate::error::{DomainError, DomainResult};

/// Longest twin or relationship ID accepted.
pub const MAX_ID_LEN: usize = 128;

/// Twin, relationship and event route IDs: 1 to 128 characters of the identifier grammar
/// ([`crate::text::check_identifier`]: no control, format, separator, private-use or unassigned
/// character, no whitespace at either end, no Latin mixed with Greek or Cyrillic), not starting
/// with `$` (reserved for system properties).
pub fn check_id(kind: &str, id: &str) -> DomainResult<()> {
    let len = id.chars().count();
    if len == 0 || len > MAX_ID_LEN {
        return Err(DomainError::InvalidArgument(format!(
            "the {kind} ID must be 1 to {MAX_ID_LEN} characters long"
        )));
    }
    if id.starts_with('$') {
        return Err(DomainError::InvalidArgument(format!(
            "the {kind} ID must not start with '$'"
        )));
    }
    crate::text::check_identifier(id)
        .map_err(|e| DomainError::InvalidArgument(format!("the {kind} ID {e}")))
}

/// Event route IDs: the ID grammar, and nothing that reads as a path (`/`, `\`, `..`) or
/// changes a URL (`?`, `#`, `%`).
pub fn check_route_id(id: &str) -> DomainResult<()> {
    check_id("event route", id)?;
    if id.contains(['/', '\\', '?', '#', '%']) || id.contains("..") {
        return Err(DomainError::InvalidArgument(
            "the event route ID must not contain '/', '\\', '?', '#', '%' or '..'".into(),
        ));
    }
    Ok(())
}

/// An event route's endpoint name, as ADT names endpoints: 3 to 50 ASCII letters, digits and
/// hyphens, starting and ending with a letter or digit, not all digits
/// (`^(?![0-9]+$)(?!-)[a-zA-Z0-9-]{2,49}[a-zA-Z0-9]$`). No URL, space, line break or escape
/// sequence can be stored and shown later.
pub fn check_endpoint_name(name: &str) -> DomainResult<()> {
    let bytes = name.as_bytes();
    let valid = (3..=50).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && !bytes.iter().all(u8::is_ascii_digit);
    if valid {
        Ok(())
    } else {
        Err(DomainError::InvalidArgument(
            "endpointName must be 3 to 50 letters, digits and hyphens, starting and ending with \
             a letter or digit, not all digits"
                .into(),
        ))
    }
}

/// Checks a twin's (or a component's) properties and components against `iface`.
///
/// Keys starting with `$` other than the system ones are rejected; so are telemetry, commands,
/// relationships and names the interface does not define. Every component the interface declares
/// must be present (as ADT requires at creation).
pub fn check_twin_contents(
    iface: &Interface,
    contents: &Map<String, Value>,
    at: &str,
) -> DomainResult<()> {
    for (name, value) in contents {
        if matches!(name.as_str(), "$dtId" | "$etag" | "$metadata") {
            continue;
        }
        let path = join(at, name);
        if let Some(property) = iface.properties.get(name) {
            property
                .schema
                .check(value)
                .map_err(|e| DomainError::ValidationFailed(format!("property '{path}': {e}")))?;
        } else if let Some(component) = iface.components.get(name) {
            let Value::Object(inner) = value else {
                return Err(DomainError::ValidationFailed(format!(
                    "component '{path}' must be a JSON object"
                )));
            };
            check_twin_contents(&component.schema, inner, &path)?;
        } else if iface.telemetry.contains_key(name) {
            return Err(DomainError::ValidationFailed(format!(
                "'{path}' is telemetry and cannot be stored on a twin"
            )));
        } else if iface.relationships.contains_key(name) || iface.commands.contains_key(name) {
            return Err(DomainError::ValidationFailed(format!(
                "'{path}' is not a property or component"
            )));
        } else {
            return Err(DomainError::ValidationFailed(format!(
                "'{path}' is not defined by model {}",
                iface.id
            )));
        }
    }
    for name in iface.components.keys() {
        if !contents.contains_key(name) {
            return Err(DomainError::ValidationFailed(format!(
                "component '{}' is missing; initialise it with {{\"$metadata\": {{}}}}",
                join(at, name)
            )));
        }
    }
    Ok(())
}

/// Checks a relationship's own properties against the relationship definition's properties.
pub fn check_relationship_properties(
    definition: &crate::dtdl::Relationship,
    doc: &Map<String, Value>,
) -> DomainResult<()> {
    for (name, value) in doc {
        if name.starts_with('$') {
            continue;
        }
        let Some(property) = definition.properties.get(name) else {
            return Err(DomainError::ValidationFailed(format!(
                "'{name}' is not a property of relationship '{}'",
                definition.name
            )));
        };
        property
            .schema
            .check(value)
            .map_err(|e| DomainError::ValidationFailed(format!("property '{name}': {e}")))?;
    }
    Ok(())
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_owned()
    } else {
        format!("{at}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_names_follow_adts_grammar_and_hold_no_url_line_break_or_escape() {
        for good in ["hub", "audit-sink", "a1b", &"e".repeat(50), "123a"] {
            assert!(check_endpoint_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "e",
            "ab",
            &"e".repeat(51),
            "-hub",
            "hub-",
            "12345",
            "https://attacker.example/hook",
            "sink\r\nX-Injected: 1",
            "sink\u{1b}[31m",
            "audit sink",
            "audit_sink",
            "s\u{131}nk",
        ] {
            assert!(check_endpoint_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_ids_read_as_names_never_as_paths() {
        for good in ["route-1", "route.v2", "路由"] {
            assert!(check_route_id(good).is_ok(), "{good}");
        }
        for bad in [
            "a/../b",
            "..",
            "a/b",
            "a\\b",
            "x?y",
            "x#y",
            "x%2fy",
            "a..b",
            "r\u{202e}1",
        ] {
            assert!(check_route_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_with_hidden_characters_or_mixed_alphabets_are_rejected_and_other_scripts_kept() {
        for good in ["room-1", "комната-1", "会議室", "δωμάτιο 2", "café-é"] {
            assert!(check_id("twin", good).is_ok(), "{good}");
        }
        for bad in [
            "room\u{200b}1",
            "room\u{202e}1",
            "room\u{2066}1",
            "\u{feff}room",
            "room\u{2028}",
            "room\u{85}",
            "room\u{ad}1",
            "room\u{e000}",
            " room",
            "room ",
            "r\u{43e}om",
            "p\u{430}yp\u{3b1}l",
        ] {
            assert!(check_id("twin", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_with_control_characters_or_too_long_are_rejected() {
        assert!(check_id("twin", "room-1").is_ok());
        assert!(check_id("twin", "").is_err());
        assert!(check_id("twin", "a\nb").is_err());
        assert!(check_id("twin", "$dtId").is_err());
        assert!(check_id("twin", &"x".repeat(129)).is_err());
        assert!(check_id("twin", &"é".repeat(128)).is_ok());
    }
}
