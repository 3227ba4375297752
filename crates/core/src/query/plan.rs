//! Choosing where a query starts and in which order its pattern is walked.
//!
//! A top-level `WHERE` conjunct `X.$dtId = 'id'` (or `X.$dtId IN [...]`) on any twin collection of
//! the pattern makes `X` the anchor: the run starts from point lookups of those IDs instead of a
//! scan, and walks the JOIN/MATCH edges outward from it (against an edge's direction where
//! needed). `FROM RELATIONSHIPS` anchors the same way on `$sourceId` (outgoing index) or
//! `$targetId` (incoming index). Every other conjunct is checked as soon as the collections it
//! reads are bound, so rows are pruned early.

use std::collections::HashSet;

use super::ast::{CmpOp, Direction, Edge, Expr, Query, Source, VarId};

pub(crate) struct Plan<'q> {
    pub seed: Seed<'q>,
    pub steps: Vec<Step<'q>>,
    /// `checks[0]` run once the seed is bound, `checks[k + 1]` once step `k` is; each with its
    /// weight for the work budget.
    pub checks: Vec<Vec<(&'q Expr, u64)>>,
}

pub(crate) enum Seed<'q> {
    /// Twins bound to `var`: the listed IDs, or every twin.
    Twins {
        var: VarId,
        ids: Option<Vec<&'q str>>,
    },
    /// Relationships bound to `var`.
    Rels { var: VarId, by: RelSeed<'q> },
}

pub(crate) enum RelSeed<'q> {
    Scan,
    Sources(Vec<&'q str>),
    Targets(Vec<&'q str>),
}

/// Walk `edge` from the bound twin `from` to `to`, in `direction` as seen from `from`.
pub(crate) struct Step<'q> {
    pub edge: &'q Edge,
    pub from: VarId,
    pub to: VarId,
    pub direction: Direction,
}

pub(crate) fn plan(query: &Query) -> Plan<'_> {
    let conjuncts: Vec<&Expr> = match &query.filter {
        None => Vec::new(),
        Some(Expr::And(terms)) => terms.iter().collect(),
        Some(e) => vec![e],
    };
    let (seed, seed_var) = match &query.source {
        Source::Relationships { var } => {
            let sources = best_anchor(&conjuncts, &[*var], "$sourceId");
            let targets = best_anchor(&conjuncts, &[*var], "$targetId");
            let by = match (sources, targets) {
                (Some((_, s)), Some((_, t))) if t.len() < s.len() => RelSeed::Targets(t),
                (Some((_, s)), _) => RelSeed::Sources(s),
                (None, Some((_, t))) => RelSeed::Targets(t),
                (None, None) => RelSeed::Scan,
            };
            (Seed::Rels { var: *var, by }, *var)
        }
        Source::Twins { root, edges } => {
            let mut twin_vars = vec![*root];
            twin_vars.extend(edges.iter().map(|e| e.to));
            match best_anchor(&conjuncts, &twin_vars, "$dtId") {
                Some((var, ids)) => (
                    Seed::Twins {
                        var,
                        ids: Some(ids),
                    },
                    var,
                ),
                None => (
                    Seed::Twins {
                        var: *root,
                        ids: None,
                    },
                    *root,
                ),
            }
        }
    };
    let steps = match &query.source {
        Source::Twins { edges, .. } => order_edges(edges, seed_var),
        Source::Relationships { .. } => Vec::new(),
    };

    // The step after which each variable is bound (0 = the seed).
    let mut bound_at = vec![0usize; query.vars.len()];
    for (k, step) in steps.iter().enumerate() {
        if let Some(slot) = bound_at.get_mut(step.to) {
            *slot = k + 1;
        }
        if let Some(rel) = step.edge.rel_var
            && let Some(slot) = bound_at.get_mut(rel)
        {
            *slot = k + 1;
        }
    }
    let mut checks = vec![Vec::new(); steps.len() + 1];
    for conjunct in conjuncts {
        let mut at = 0;
        conjunct.for_each_var(&mut |v| at = at.max(bound_at.get(v).copied().unwrap_or(0)));
        if let Some(list) = checks.get_mut(at) {
            list.push((conjunct, conjunct.weight()));
        }
    }
    Plan {
        seed,
        steps,
        checks,
    }
}

/// Orders the pattern's edges breadth-first from `start`. The pattern is a tree (JOIN targets
/// and MATCH nodes are declared once), so every edge is reached.
fn order_edges(edges: &[Edge], start: VarId) -> Vec<Step<'_>> {
    let mut bound = vec![start];
    let mut used = vec![false; edges.len()];
    let mut steps = Vec::with_capacity(edges.len());
    while steps.len() < edges.len() {
        let before = steps.len();
        for (i, edge) in edges.iter().enumerate() {
            if used[i] {
                continue;
            }
            let step = if bound.contains(&edge.from) {
                Step {
                    edge,
                    from: edge.from,
                    to: edge.to,
                    direction: edge.direction,
                }
            } else if bound.contains(&edge.to) {
                Step {
                    edge,
                    from: edge.to,
                    to: edge.from,
                    direction: edge.direction.reversed(),
                }
            } else {
                continue;
            };
            used[i] = true;
            bound.push(step.to);
            steps.push(step);
        }
        if steps.len() == before {
            // Unreachable for patterns the parser builds; stop rather than loop.
            break;
        }
    }
    steps
}

/// The conjunct `V.<key> = 'x'` or `V.<key> IN [...]` with the fewest IDs among `vars`.
fn best_anchor<'q>(
    conjuncts: &[&'q Expr],
    vars: &[VarId],
    key: &str,
) -> Option<(VarId, Vec<&'q str>)> {
    let mut best: Option<(VarId, Vec<&'q str>)> = None;
    for conjunct in conjuncts {
        let Some((var, ids)) = anchor_of(conjunct, key) else {
            continue;
        };
        if !vars.contains(&var) {
            continue;
        }
        if best.as_ref().is_none_or(|(_, b)| ids.len() < b.len()) {
            best = Some((var, ids));
        }
    }
    best
}

fn anchor_of<'q>(expr: &'q Expr, key: &str) -> Option<(VarId, Vec<&'q str>)> {
    let is_key = |e: &Expr| match e {
        Expr::Path { var, path } if path.len() == 1 && path[0] == key => Some(*var),
        _ => None,
    };
    match expr {
        Expr::Compare(CmpOp::Eq, a, b) => match (a.as_ref(), b.as_ref()) {
            (p, Expr::Literal(serde_json::Value::String(s)))
            | (Expr::Literal(serde_json::Value::String(s)), p) => {
                is_key(p).map(|var| (var, vec![s.as_str()]))
            }
            _ => None,
        },
        Expr::In {
            expr,
            list,
            negated: false,
        } => {
            let var = is_key(expr)?;
            let mut seen = HashSet::with_capacity(list.len());
            let ids = list
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|id| seen.insert(*id))
                .collect();
            Some((var, ids))
        }
        _ => None,
    }
}
