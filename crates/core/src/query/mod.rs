//! The Azure Digital Twins query language.
