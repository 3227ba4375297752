//! The Azure Digital Twins query language.
//!
//! # Grammar
//!
//! Keywords are case-insensitive; collection names, property names and values are
//! case-sensitive. A reserved word is used as a name by escaping it: `[[Group]]`.
//!
//! ```text
//! query      := SELECT [TOP '(' n ')'] projection FROM source [WHERE condition]
//! projection := '*' | COUNT '(' ')' [AS name] | item (',' item)*   -- TOP alone means '*'
//! item       := path [AS name]                 -- key: the alias, else the last path segment
//! source     := DIGITALTWINS [[AS] name] join*
//!             | DIGITALTWINS MATCH pattern
//!             | RELATIONSHIPS [[AS] name]
//! join       := JOIN name RELATED name '.' relationshipName [[AS] name]
//! pattern    := node (edge node)*              -- at most 10 edges
//! node       := '(' [name] ')' | name
//! edge       := '-' '[' body ']' '->' | '<-' '[' body ']' '-' | '-' '[' body ']' '-'
//! body       := [var] [':' relName ('|' relName)*] ['*' hops]  -- `[r]` is a variable,
//!                                                               -- `[a|b]`, `[a*2]` are names
//! hops       := n | n '..' m | '..' m          -- ADT semantics: n..m is n+1 to m hops
//! condition  := or;  or := and (OR and)*;  and := not (AND not)*;  not := NOT* comparison
//! comparison := operand [('=' | '!=' | '<>' | '<' | '>' | '<=' | '>=') operand
//!                       | (IN | NIN | NOT IN) list]
//! operand    := literal | path | function '(' args ')' | '(' condition ')'
//! list       := '[' literal (',' literal)* ']' | '(' ... ')'
//! path       := name ('.' name)*               -- `$dtId`, `T.$metadata.$model`, `T.comp.p`
//! ```
//!
//! Functions: `IS_OF_MODEL([collection,] 'dtmi' [, exact])`, `IS_DEFINED`, `IS_NULL`, `IS_BOOL`,
//! `IS_NUMBER`, `IS_STRING`, `IS_PRIMITIVE`, `IS_OBJECT`, `STARTSWITH` (or `STARTS_WITH`),
//! `ENDSWITH` (or `ENDS_WITH`), `CONTAINS`, `ARRAY_CONTAINS`.
//!
//! A path whose first segment is not a collection name refers to the query's only collection
//! (`SELECT * FROM DIGITALTWINS WHERE $dtId = 'x'`); with several collections it is an error.
//!
//! # Semantics
//!
//! - Conditions use Cosmos SQL's three-valued logic (see [`eval`]): missing properties and
//!   comparisons across types are *undefined*, and only `true` passes `WHERE`.
//! - A single-hop JOIN or MATCH edge yields one row per relationship. A multi-hop MATCH edge
//!   (`*2`, `*1..3`) yields one row per distinct twin reached at an allowed depth by a
//!   breadth-first walk that traverses each relationship at most once (ADT: "cyclic
//!   relationships are automatically detected, so that a relationship is traversed only once")
//!   and never re-enters the start twin. Its cost is linear in the relationships within reach.
//! - `SELECT *` returns the document itself; with MATCH, an object of every named collection.
//!   With JOIN it is rejected, as in ADT.
//! - JOIN and MATCH need no `$dtId` condition (ADT requires one): without one they start from a
//!   scan, bounded by the work budget.
//! - `visible` hides twins as if absent: not returned, not counted, not traversed; a
//!   relationship is visible only if both its twins are.
//!
//! # Execution and cost
//!
//! See [`plan`] for how the starting point is chosen (point lookups for `$dtId` conditions).
//! Each execution reads one immutable [`Graph`] snapshot, so a page is read consistent. Work is
//! bounded by [`limits::MAX_WORK`] (entities examined, documents parsed and their bytes, result
//! bytes, subtree-walk steps along the caller's scope, expression nodes); a query past it, past
//! its deadline, or with a single row over [`limits::MAX_PAGE_BYTES`] fails with
//! `QueryLimitExceeded`. A page ends before the row that would take its items past
//! [`limits::MAX_PAGE_BYTES`]. [`QueryPage::cost`] reports what the page cost.
//!
//! The query charge is `1 + (examined + bytes / 8192) / 100`, rounded to two decimals, where
//! `examined` counts the IDs the query names (each one lookup, whether the twin exists or not)
//! and the twins and relationships the run looked at *that the caller may see*, and `bytes`
//! the stored JSON parsed plus the result bytes produced. It is deterministic for a given
//! graph.
//!
//! Hidden equals absent here too: a twin outside `visible`, and a relationship with such a twin
//! at either end, is skipped before it is counted, so it adds nothing to the charge or to the
//! work budget. Subtree-walk steps are charged only for twins examined as visible (see
//! [`Bounds::scope_steps`]): a visible twin asked about only on the way to skipping a
//! relationship to a hidden one charges nothing then. The charge, the rows, the page boundaries, the continuation tokens and whether
//! `QueryLimitExceeded` is reached are therefore the same as in a graph where those entities do
//! not exist. What hidden entities still cost is wall-clock time: skipping one is a lookup and
//! a visibility check, bounded by the relationships of the visible twins a walk reaches and by
//! the size of the graph for scans (timing is outside this guarantee).
//!
//! # Paging
//!
//! A page is `page_size` rows (1 to [`limits::MAX_PAGE_SIZE`]) after skipping `offset` rows, or
//! fewer when the next row would take the page past [`limits::MAX_PAGE_BYTES`]. A
//! continuation token is the URL-safe base64 (no padding) of `{"q": text, "o": offset}`; the
//! next page parses the text again and runs it from the start, skipping `offset` rows. Pages are
//! therefore consistent with the snapshot each one reads, not with each other (as in ADT). Row
//! order is the graph's iteration order, which is the instance's (`graph::order`): the same on
//! every node holding the same twins and after a restart, so a token resumes at the same row on
//! whichever node a load balancer sends it to. Tokens carry no authority: the next page is run with the
//! caller's own `visible`.

mod ast;
mod error;
mod eval;
mod exec;
mod lexer;
pub mod limits;
mod parser;
mod plan;

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod tests_exec;
#[cfg(test)]
mod tests_parse;
#[cfg(test)]
mod tests_traverse;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use ast::Query;
pub use error::{QueryError, QueryErrorKind};
pub use exec::Bounds;

use crate::graph::{Graph, Twin};

/// One page of results.
#[derive(Debug, Clone)]
pub struct QueryPage {
    /// Each item serialized, as the response carries it.
    pub items: Vec<Box<RawValue>>,
    /// Token for the next page; `None` on the last one.
    pub continuation: Option<String>,
    /// The `query-charge` header value.
    pub charge: f64,
    /// What the execution that produced this page cost.
    pub cost: QueryCost,
}

/// What one page's execution did: the figures the work budget and the resource tests read.
/// Like the charge, they count only what the caller may see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryCost {
    /// Twin and relationship documents parsed from their stored JSON.
    pub parses: u64,
    /// The JSON bytes of those documents.
    pub parsed_bytes: u64,
    /// Serialized bytes of the page's items with the commas between them (the `value` array
    /// without its brackets): at most [`limits::MAX_PAGE_BYTES`].
    pub page_bytes: u64,
    /// Subtree-membership walk steps charged to the work budget: those of the paths that place
    /// the twins the page examined as visible in the caller's subtree scopes
    /// (`access::QueryScope::charge`), each path charged up to a twin charged before.
    pub scope_steps: u64,
}

impl QueryPage {
    /// The items parsed back into JSON values (for tests and tools; the server sends the
    /// serialized items as they are).
    pub fn values(&self) -> Vec<Value> {
        self.items
            .iter()
            .map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
            .collect()
    }
}

/// What a client sent: a new query, or a token from a previous page.
#[derive(Debug, Clone, Copy)]
pub enum QueryRequest<'a> {
    Text(&'a str),
    Continuation(&'a str),
}

/// Parses query text.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    parser::parse(text)
}

/// Runs a parsed query and returns the page that starts after `offset` rows. `text` is the
/// query's text, carried in the continuation token.
pub fn execute(
    graph: &Graph,
    query: &Query,
    text: &str,
    offset: usize,
    page_size: usize,
    visible: &dyn Fn(&Twin) -> bool,
) -> Result<QueryPage, QueryError> {
    execute_with_budget(
        graph,
        query,
        text,
        offset,
        page_size,
        visible,
        limits::MAX_WORK,
    )
}

/// [`execute`] with a work budget other than [`limits::MAX_WORK`].
pub fn execute_with_budget(
    graph: &Graph,
    query: &Query,
    text: &str,
    offset: usize,
    page_size: usize,
    visible: &dyn Fn(&Twin) -> bool,
    max_work: u64,
) -> Result<QueryPage, QueryError> {
    let bounds = Bounds {
        max_work,
        ..Bounds::default()
    };
    execute_bounded(graph, query, text, offset, page_size, visible, &bounds)
}

/// [`execute`] within `bounds`: a work budget, a page byte cap and a deadline.
pub fn execute_bounded(
    graph: &Graph,
    query: &Query,
    text: &str,
    offset: usize,
    page_size: usize,
    visible: &dyn Fn(&Twin) -> bool,
    bounds: &Bounds<'_>,
) -> Result<QueryPage, QueryError> {
    let take = page_size.clamp(1, limits::MAX_PAGE_SIZE);
    let outcome = exec::run(graph, query, offset, take, visible, bounds)?;
    let continuation = outcome
        .more
        .then(|| continuation_token(text, offset.saturating_add(outcome.items.len())));
    let cost = QueryCost {
        parses: outcome.parses,
        parsed_bytes: outcome.parsed_bytes,
        page_bytes: outcome.page_bytes,
        scope_steps: outcome.scope_steps,
    };
    Ok(QueryPage {
        items: outcome.items,
        continuation,
        charge: charge(outcome.examined, &cost),
        cost,
    })
}

/// Parses (or decodes) and runs one request: the whole flow of `POST /query`.
pub fn run(
    graph: &Graph,
    request: QueryRequest<'_>,
    page_size: usize,
    visible: &dyn Fn(&Twin) -> bool,
) -> Result<QueryPage, QueryError> {
    let (text, offset) = match request {
        QueryRequest::Text(text) => (text.to_owned(), 0),
        QueryRequest::Continuation(token) => decode_continuation(token)?,
    };
    let query = parse(&text)?;
    execute(graph, &query, &text, offset, page_size, visible)
}

/// Bytes parsed or produced that count as one examined entity in the charge.
const CHARGE_BYTES_PER_UNIT: u64 = 8 * 1024;

fn charge(examined: u64, cost: &QueryCost) -> f64 {
    let bytes = cost.parsed_bytes.saturating_add(cost.page_bytes) / CHARGE_BYTES_PER_UNIT;
    // Precision loss only past 2^53 units, far beyond the work budget.
    #[allow(clippy::cast_precision_loss)]
    let units = examined.saturating_add(bytes) as f64;
    ((1.0 + units / 100.0) * 100.0).round() / 100.0
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Continuation {
    q: String,
    o: usize,
}

/// The token that resumes `text` after `offset` rows.
pub fn continuation_token(text: &str, offset: usize) -> String {
    let json = serde_json::to_vec(&Continuation {
        q: text.to_owned(),
        o: offset,
    })
    .unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// The query text and offset in a token from [`continuation_token`].
pub fn decode_continuation(token: &str) -> Result<(String, usize), QueryError> {
    // Generous: the JSON-escaped text of the longest query, base64 encoded.
    const MAX_TOKEN: usize = limits::MAX_QUERY_CHARS * 4 * 6 * 4 / 3 + 64;
    let invalid = || QueryError::continuation("the continuation token is not valid");
    if token.len() > MAX_TOKEN {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| invalid())?;
    let c: Continuation = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    Ok((c.q, c.o))
}
