//! Running a planned query over one graph snapshot: seed, walk the pattern depth-first, check
//! conditions as soon as their collections are bound, and hand complete rows to the page.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::ast::{Direction, Query, Select, Source};
use super::error::QueryError;
use super::eval::{Bound, eval, lookup};
use super::limits;
use super::plan::{Plan, RelSeed, Seed, Step, plan};
use crate::graph::{Graph, Relationship, Twin};

/// What one execution produced.
pub(crate) struct Outcome {
    pub items: Vec<Value>,
    /// Rows exist past the returned ones.
    pub more: bool,
    /// Twins and relationships examined that the caller may see, plus the IDs the query
    /// names: what the charge is computed from.
    pub examined: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

pub(crate) fn run(
    graph: &Graph,
    query: &Query,
    skip: usize,
    take: usize,
    visible: &dyn Fn(&Twin) -> bool,
    max_work: u64,
) -> Result<Outcome, QueryError> {
    let plan = plan(query);
    let counting = matches!(query.select, Select::Count { .. });
    let mut run = Run {
        graph,
        query,
        visible,
        plan: &plan,
        work: 0,
        max_work,
        examined: 0,
        rows: 0,
        skip,
        take,
        counting,
        items: Vec::new(),
        more: false,
    };
    let mut row = vec![Bound::Unbound; query.vars.len()];
    if query.top != Some(0) {
        run.seed(&mut row)?;
    }
    let mut items = run.items;
    if let Select::Count { name } = &query.select
        && skip == 0
    {
        let mut object = Map::new();
        object.insert(name.clone(), Value::from(run.rows));
        items.push(Value::Object(object));
    }
    Ok(Outcome {
        items,
        more: run.more,
        examined: run.examined,
    })
}

struct Run<'a> {
    graph: &'a Graph,
    query: &'a Query,
    visible: &'a dyn Fn(&Twin) -> bool,
    plan: &'a Plan<'a>,
    work: u64,
    max_work: u64,
    examined: u64,
    /// Rows that passed every condition so far.
    rows: u64,
    skip: usize,
    take: usize,
    counting: bool,
    items: Vec<Value>,
    more: bool,
}

impl<'a> Run<'a> {
    fn spend(&mut self, units: u64) -> Result<(), QueryError> {
        self.work = self.work.saturating_add(units);
        if self.work > self.max_work {
            return Err(QueryError::work_limit(
                "the query needs more work than one query may do; narrow it with a $dtId \
                 condition, fewer hops or a more selective WHERE",
            ));
        }
        Ok(())
    }

    /// Counts one examined twin or relationship that the caller may see (or one ID the query
    /// names). Entities outside the caller's scopes are never counted: the charge, the work
    /// budget and so the `QueryLimitExceeded` answer depend only on what the caller sees, as if
    /// those entities were absent.
    fn examine(&mut self) -> Result<(), QueryError> {
        self.examined += 1;
        self.spend(limits::WORK_PER_ENTITY)
    }

    /// Whether the caller may see `bound`, counting it as examined if so.
    fn examine_if_visible(&mut self, bound: &Bound<'a>) -> Result<bool, QueryError> {
        let visible = match bound {
            Bound::Twin(t, _) => self.twin_visible(t),
            Bound::Rel(r, _) => self.rel_visible(r),
            Bound::Unbound => false,
        };
        if visible {
            self.examine()?;
        }
        Ok(visible)
    }

    fn twin_visible(&self, twin: &Twin) -> bool {
        (self.visible)(twin)
    }

    /// A relationship exists for the caller only if both its twins do.
    fn rel_visible(&self, rel: &Relationship) -> bool {
        let ok = |id: &str| self.graph.twin(id).is_some_and(|t| (self.visible)(t));
        ok(&rel.source) && ok(&rel.target)
    }

    fn checks_pass(&mut self, at: usize, row: &[Bound<'a>]) -> Result<bool, QueryError> {
        let plan = self.plan;
        for (expr, weight) in plan.checks.get(at).map(Vec::as_slice).unwrap_or_default() {
            self.spend(*weight)?;
            if !eval(expr, row, self.graph).is_true() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn seed(&mut self, row: &mut [Bound<'a>]) -> Result<(), QueryError> {
        let graph = self.graph;
        match &self.plan.seed {
            Seed::Twins {
                var,
                ids: Some(ids),
            } => {
                // Each named ID costs one lookup whether it is visible, hidden or absent.
                for id in ids {
                    self.examine()?;
                    let Some(twin) = graph.twin(id) else { continue };
                    if !self.twin_visible(twin) {
                        continue;
                    }
                    if self.bind_seed(row, *var, Bound::twin_of(twin))? == Flow::Stop {
                        break;
                    }
                }
            }
            Seed::Twins { var, ids: None } => {
                for twin in graph.twins() {
                    let bound = Bound::twin_of(twin);
                    if !self.examine_if_visible(&bound)? {
                        continue;
                    }
                    if self.bind_seed(row, *var, bound)? == Flow::Stop {
                        break;
                    }
                }
            }
            Seed::Rels {
                var,
                by: RelSeed::Scan,
            } => {
                for rel in graph.relationships() {
                    let bound = Bound::rel_of(rel);
                    if !self.examine_if_visible(&bound)? {
                        continue;
                    }
                    if self.bind_seed(row, *var, bound)? == Flow::Stop {
                        break;
                    }
                }
            }
            Seed::Rels {
                var,
                by: RelSeed::Sources(ids),
            } => {
                'ids: for id in ids {
                    for rel in graph.outgoing(id) {
                        let bound = Bound::rel_of(rel);
                        if !self.examine_if_visible(&bound)? {
                            continue;
                        }
                        if self.bind_seed(row, *var, bound)? == Flow::Stop {
                            break 'ids;
                        }
                    }
                }
            }
            Seed::Rels {
                var,
                by: RelSeed::Targets(ids),
            } => {
                'ids: for id in ids {
                    for rel in graph.incoming(id) {
                        let bound = Bound::rel_of(rel);
                        if !self.examine_if_visible(&bound)? {
                            continue;
                        }
                        if self.bind_seed(row, *var, bound)? == Flow::Stop {
                            break 'ids;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Binds a seed the caller may see (the callers check it) and walks on from it.
    fn bind_seed(
        &mut self,
        row: &mut [Bound<'a>],
        var: usize,
        bound: Bound<'a>,
    ) -> Result<Flow, QueryError> {
        set(row, var, bound);
        if !self.checks_pass(0, row)? {
            return Ok(Flow::Continue);
        }
        self.descend(0, row)
    }

    fn descend(&mut self, k: usize, row: &mut [Bound<'a>]) -> Result<Flow, QueryError> {
        let plan = self.plan;
        let Some(step) = plan.steps.get(k) else {
            return self.emit(row);
        };
        let Some(from) = row.get(step.from).and_then(Bound::twin) else {
            return Ok(Flow::Continue);
        };
        match step.edge.hops {
            None => self.single_hop(k, step, from, row),
            Some((min, max)) => {
                let reached = self.reach(from, step, min, max)?;
                for twin in reached {
                    set(row, step.to, Bound::twin_of(twin));
                    if self.checks_pass(k + 1, row)? && self.descend(k + 1, row)? == Flow::Stop {
                        return Ok(Flow::Stop);
                    }
                }
                Ok(Flow::Continue)
            }
        }
    }

    fn single_hop(
        &mut self,
        k: usize,
        step: &Step<'a>,
        from: &'a Arc<Twin>,
        row: &mut [Bound<'a>],
    ) -> Result<Flow, QueryError> {
        let graph = self.graph;
        for (rel, other) in adjacent(graph, &from.id, step.direction) {
            // `from` is visible, so the relationship is visible exactly when `other` is.
            let Some(twin) = graph.twin(other) else {
                continue;
            };
            if !self.twin_visible(twin) {
                continue;
            }
            self.examine()?;
            if !name_allowed(&step.edge.names, rel) {
                continue;
            }
            set(row, step.to, Bound::twin_of(twin));
            if let Some(rel_var) = step.edge.rel_var {
                set(row, rel_var, Bound::rel_of(rel));
            }
            if self.checks_pass(k + 1, row)? && self.descend(k + 1, row)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Distinct twins reached from `start` after `min..=max` hops, in breadth-first order.
    /// As in ADT, each relationship is traversed at most once, so cycles end; the start twin is
    /// never re-entered. The work is linear in the relationships within `max` hops.
    fn reach(
        &mut self,
        start: &'a Arc<Twin>,
        step: &Step<'a>,
        min: u32,
        max: u32,
    ) -> Result<Vec<&'a Arc<Twin>>, QueryError> {
        let graph = self.graph;
        let mut used: HashSet<*const Relationship> = HashSet::new();
        let mut found = Vec::new();
        let mut seen: HashSet<&'a str> = HashSet::new();
        let mut frontier: Vec<&'a Arc<Twin>> = vec![start];
        for depth in 1..=max {
            let mut next = Vec::new();
            let mut in_next: HashSet<&'a str> = HashSet::new();
            for at in frontier {
                for (rel, other) in adjacent(graph, &at.id, step.direction) {
                    // Every twin on the frontier is visible, so the relationship is visible
                    // exactly when `other` is; hidden ones are skipped before they count.
                    let Some(twin) = graph.twin(other) else {
                        continue;
                    };
                    if !self.twin_visible(twin) {
                        continue;
                    }
                    self.examine()?;
                    if other == &*start.id
                        || !name_allowed(&step.edge.names, rel)
                        || !used.insert(Arc::as_ptr(rel))
                    {
                        continue;
                    }
                    if in_next.insert(&twin.id) {
                        next.push(twin);
                    }
                    if depth >= min && seen.insert(&twin.id) {
                        found.push(twin);
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        Ok(found)
    }

    fn emit(&mut self, row: &[Bound<'a>]) -> Result<Flow, QueryError> {
        self.spend(1)?;
        if self.counting {
            self.rows += 1;
            return Ok(Flow::Continue);
        }
        if self.items.len() == self.take && self.rows >= self.skip as u64 {
            self.more = true;
            return Ok(Flow::Stop);
        }
        self.rows += 1;
        if self.rows > self.skip as u64 {
            self.items.push(project(self.query, row));
        }
        if self.query.top.is_some_and(|top| self.rows >= top) {
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    }
}

fn set<'a>(row: &mut [Bound<'a>], var: usize, bound: Bound<'a>) {
    if let Some(slot) = row.get_mut(var) {
        *slot = bound;
    }
}

fn name_allowed(names: &[String], rel: &Relationship) -> bool {
    names.is_empty() || names.iter().any(|n| **n == *rel.name)
}

/// Relationships at `id` in `direction`, each with the twin at its other end. For `Both`, a
/// relationship from a twin to itself is listed once.
fn adjacent<'g>(
    graph: &'g Graph,
    id: &'g str,
    direction: Direction,
) -> impl Iterator<Item = (&'g Arc<Relationship>, &'g str)> + 'g {
    let out = matches!(direction, Direction::Out | Direction::Both)
        .then(|| graph.outgoing(id))
        .into_iter()
        .flatten()
        .map(|r| (r, &*r.target));
    let inc = matches!(direction, Direction::In | Direction::Both)
        .then(|| graph.incoming(id))
        .into_iter()
        .flatten()
        .filter(move |r| direction != Direction::Both || r.source != r.target)
        .map(|r| (r, &*r.source));
    out.chain(inc)
}

fn project(query: &Query, row: &[Bound<'_>]) -> Value {
    match &query.select {
        Select::Star if query.is_match => {
            let mut object = Map::new();
            for (var, bound) in query.vars.iter().zip(row) {
                if let (Some(name), Some(doc)) = (&var.name, bound.doc()) {
                    object.insert(name.clone(), Value::Object(doc.clone()));
                }
            }
            Value::Object(object)
        }
        Select::Star => {
            let var = match &query.source {
                Source::Twins { root, .. } => *root,
                Source::Relationships { var } => *var,
            };
            row.get(var)
                .and_then(|b| b.doc())
                .map_or(Value::Null, |doc| Value::Object(doc.clone()))
        }
        Select::Items(items) => {
            let mut object = Map::new();
            for item in items {
                let value = row
                    .get(item.var)
                    .and_then(|bound| lookup(bound, &item.path).to_json());
                if let Some(value) = value {
                    object.insert(item.key.clone(), value);
                }
            }
            Value::Object(object)
        }
        Select::Count { .. } => Value::Null,
    }
}
