//! DTDL v2 and v3: parsing, validation and compilation of interfaces, and checking values
//! against their schemas.

mod compile;
mod literals;
mod model;
mod props;
mod reader;
mod values;
mod vocab;

use std::sync::Arc;

use serde_json::Value;

pub use compile::ENUM_VALUE_UNITS;
pub use model::*;
pub use values::ValueError;

use crate::dtmi::Dtmi;

/// Options of the parser, named after the official parser's options.
#[derive(Debug, Clone, Default)]
pub struct ParseOptions {
    /// Reject any `@context` extension the parser does not define (the server's uploads always
    /// run with this set).
    pub disallow_undefined_extensions: bool,
}

impl ParseOptions {
    pub fn strict() -> Self {
        Self {
            disallow_undefined_extensions: true,
        }
    }
}

/// Why a set of DTDL documents was rejected. Messages are meant for the model author.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .messages.join("; "))]
pub struct DtdlError {
    pub messages: Vec<String>,
}

impl DtdlError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            messages: vec![message.into()],
        }
    }
}

/// Parses and validates a batch of DTDL documents as one unit and returns the compiled top-level
/// interfaces in input order.
///
/// References to interfaces outside the batch (`extends`, component schemas) are looked up with
/// `resolve`, which returns already accepted interfaces.
pub fn parse(
    documents: &[Value],
    resolve: &dyn Fn(&Dtmi) -> Option<Arc<Interface>>,
    options: &ParseOptions,
) -> Result<Vec<Arc<Interface>>, DtdlError> {
    compile(documents, resolve, options, DEFAULT_WORK_LIMIT).map(|c| c.interfaces)
}

/// Work one [`parse`] may do, in the units of [`Compiled::work`]: enough for thousands of
/// RealEstateCore-sized interfaces, far below what would hurt the server.
pub const DEFAULT_WORK_LIMIT: usize = 4_000_000;

/// A compiled batch and the work it took.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub interfaces: Vec<Arc<Interface>>,
    /// Units of work: elements read, content entries merged or copied, ancestors copied,
    /// schema nodes walked or built. Every interface, content and schema is worked on once
    /// whatever the number of paths to it, so this grows with the size of the documents and of
    /// the compiled interfaces, never with the number of paths through the inheritance graph.
    pub work: usize,
}

/// [`parse`] with a limit on the work: a batch that would need more is refused with an error
/// naming the limit, before it allocates what it would need.
pub fn compile(
    documents: &[Value],
    resolve: &dyn Fn(&Dtmi) -> Option<Arc<Interface>>,
    options: &ParseOptions,
    work_limit: usize,
) -> Result<Compiled, DtdlError> {
    let mut reader = reader::Reader::new(options);
    for doc in documents {
        reader.document(doc).map_err(DtdlError::new)?;
    }
    compile::link(&mut reader.nodes).map_err(DtdlError::new)?;
    let mut compiler =
        compile::Compiler::new(&reader.nodes, resolve, work_limit).map_err(DtdlError::new)?;
    let interfaces = compiler.run(&reader.roots).map_err(DtdlError::new)?;
    Ok(Compiled {
        interfaces,
        work: compiler.work(),
    })
}

#[cfg(test)]
mod tests;
