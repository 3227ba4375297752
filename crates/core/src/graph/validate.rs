//! Checks of twin and relationship contents against their compiled DTDL interface.

use serde_json::{Map, Value};

use crate::dtdl::Interface;
use crate::error::{DomainError, DomainResult};

/// Longest twin or relationship ID accepted.
pub const MAX_ID_LEN: usize = 128;

/// Twin and relationship IDs: 1 to 128 characters, none of them a control character, and not
/// starting with `$` (reserved for system properties).
pub fn check_id(kind: &str, id: &str) -> DomainResult<()> {
    let len = id.chars().count();
    if len == 0 || len > MAX_ID_LEN {
        return Err(DomainError::InvalidArgument(format!(
            "the {kind} ID must be 1 to {MAX_ID_LEN} characters long"
        )));
    }
    if id.chars().any(char::is_control) || id.starts_with('$') {
        return Err(DomainError::InvalidArgument(format!(
            "the {kind} ID contains a character that is not allowed"
        )));
    }
    Ok(())
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
    fn ids_with_control_characters_or_too_long_are_rejected() {
        assert!(check_id("twin", "room-1").is_ok());
        assert!(check_id("twin", "").is_err());
        assert!(check_id("twin", "a\nb").is_err());
        assert!(check_id("twin", "$dtId").is_err());
        assert!(check_id("twin", &"x".repeat(129)).is_err());
        assert!(check_id("twin", &"é".repeat(128)).is_ok());
    }
}
