//! The query language's limits. Each is at least as generous as the Azure Digital Twins limit it
//! mirrors (quoted beside it), so a query that ADT accepts is never refused for its shape here.

/// Characters in the query text (ADT: 8,000).
pub const MAX_QUERY_CHARS: usize = 32_768;
/// `JOIN` clauses in one query (ADT: 5).
pub const MAX_JOINS: usize = 10;
/// Values in one `IN`/`NIN` list (ADT: 50, or 100 in the operators reference).
pub const MAX_IN_ITEMS: usize = 1_000;
/// `AND`/`OR` operators in one query (ADT: 50).
pub const MAX_LOGICAL_OPS: usize = 500;
/// Hops one MATCH relationship condition can span (ADT: 10 in a query).
pub const MAX_HOPS: u32 = 10;
/// Relationship conditions in one MATCH pattern (ADT: not documented).
pub const MAX_MATCH_EDGES: usize = 10;
/// Nesting of parentheses, `NOT`s and function calls; bounds the parser's recursion (ADT: not
/// documented).
pub const MAX_NESTING: usize = 64;
/// Collections (twin and relationship variables) one query can declare.
pub const MAX_COLLECTIONS: usize = 32;
/// Columns in a SELECT list.
pub const MAX_SELECT_ITEMS: usize = 100;
/// Segments of one property path (`T.a.b.c`).
pub const MAX_PATH_SEGMENTS: usize = 32;
/// Items in one page (ADT: 100 by default, adjustable).
pub const MAX_PAGE_SIZE: usize = 1_000;
/// Work one query execution may do before it is stopped, in units: [`WORK_PER_ENTITY`] per
/// twin or relationship examined, one per expression node evaluated and one per row produced
/// (ADT bounds queries by query units and time instead). About 1.5 million twins and
/// relationships examined: a scan of a 1,000,000-twin graph with a short WHERE fits. Measured
/// on a 100k-twin graph, a query that exhausts it runs for one to three seconds.
pub const MAX_WORK: u64 = 12_000_000;
/// Work units for examining one twin or relationship: a hash lookup with likely cache misses
/// costs about as much as evaluating eight expression nodes.
pub const WORK_PER_ENTITY: u64 = 8;
/// Work units for parsing one stored document, on top of its bytes.
pub const WORK_PER_PARSE: u64 = 8;
/// Stored JSON bytes parsed per work unit: parsing a document into a tree costs about as much
/// per 16 bytes as one expression node.
pub const PARSED_BYTES_PER_UNIT: u64 = 16;
/// Serialized result bytes per work unit.
pub const PAGE_BYTES_PER_UNIT: u64 = 64;
/// Serialized bytes of one page's items (ADT bounds a page by its query units instead). A page
/// stops before the row that would pass it; the continuation token resumes at that row. A row
/// larger than this alone is refused with `QueryLimitExceeded`.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Stored JSON bytes of the documents one execution keeps parsed for its whole run, so a twin
/// reached again later parses once. Past it, a document is shared only while a binding of it is
/// in the current row, and a twin reached again after that is parsed (and charged) again.
pub const DOC_CACHE_BYTES: usize = 2 * 1024 * 1024;
/// Work units between two looks at the query's deadline.
pub const DEADLINE_CHECK_UNITS: u64 = 16_384;
/// Unseen (hidden) entities skipped between two looks at the query's deadline.
pub const DEADLINE_CHECK_SKIPS: u64 = 4_096;
/// How long one query execution (one page) may run: past it, it stops with
/// `QueryLimitExceeded`. The work budget ends a query well before on ordinary hardware; the
/// deadline bounds what the budget does not count (entities hidden from the caller, a slow
/// machine).
pub const QUERY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Work units per relationship a subtree-membership walk follows (a lookup, like examining an
/// entity). Walks are remembered per query, so a twin is walked from at most once.
pub const WORK_PER_SCOPE_STEP: u64 = 8;
