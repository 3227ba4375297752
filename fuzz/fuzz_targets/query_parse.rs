#![no_main]
//! The ADT query parser on arbitrary text; a query that parses is also executed on an empty
//! graph, so the planner and evaluator see it too.

use libfuzzer_sys::fuzz_target;
use twinguard_core::graph::Graph;
use twinguard_core::query;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(parsed) = query::parse(text)
    {
        let _ = query::execute(&Graph::default(), &parsed, text, 0, 10, &|_| true);
    }
});
