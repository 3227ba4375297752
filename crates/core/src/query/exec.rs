//! Running a planned query over one graph snapshot: seed, walk the pattern depth-first, check
//! conditions as soon as their collections are bound, and hand complete rows to the page.
//!
//! Documents are shared, not copied: a twin bound again while another binding of it is in the
//! row, or while it is in the run's document cache, shares that binding's parsed document, so
//! self-loops and cycles parse a twin once. A whole document in a result is copied from its
//! stored JSON text, never parsed. Rows are serialized as they are produced, and the page stops
//! before the row that would take it past its byte cap.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::ast::{Direction, Query, Select, Source};
use super::error::QueryError;
use super::eval::{Bound, Doc, Meter, Val, eval, lookup};
use super::limits;
use super::plan::{Plan, RelSeed, Seed, Step, plan};
use crate::graph::{Graph, Relationship, Twin};

/// What bounds one execution besides the query's own shape.
#[derive(Clone, Copy)]
pub struct Bounds<'a> {
    /// Work units (see [`limits::MAX_WORK`]).
    pub max_work: u64,
    /// Serialized bytes of a page's items (see [`limits::MAX_PAGE_BYTES`]).
    pub max_page_bytes: usize,
    /// Whether the query's deadline has passed; asked every [`limits::DEADLINE_CHECK_UNITS`]
    /// work units and every [`limits::DEADLINE_CHECK_SKIPS`] entities skipped unseen.
    pub expired: &'a dyn Fn() -> bool,
    /// The subtree-walk steps to charge for examining a twin the caller may see
    /// (`access::QueryScope::charge`); each costs [`limits::WORK_PER_SCOPE_STEP`]. Asked only
    /// for twins the run examines as visible, never for those it skips, so that what is
    /// charged does not depend on what the caller may not see.
    pub scope_steps: &'a dyn Fn(&Twin) -> u64,
}

impl Default for Bounds<'_> {
    fn default() -> Self {
        Bounds {
            max_work: limits::MAX_WORK,
            max_page_bytes: limits::MAX_PAGE_BYTES,
            expired: &|| false,
            scope_steps: &|_| 0,
        }
    }
}

/// What one execution produced.
pub(crate) struct Outcome {
    pub items: Vec<Box<RawValue>>,
    /// Rows exist past the returned ones.
    pub more: bool,
    /// Twins and relationships examined that the caller may see, plus the IDs the query
    /// names: what the charge is computed from.
    pub examined: u64,
    /// Documents parsed, and their JSON bytes.
    pub parses: u64,
    pub parsed_bytes: u64,
    /// Serialized bytes of `items`.
    pub page_bytes: u64,
    /// Subtree-walk steps charged.
    pub scope_steps: u64,
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
    bounds: &Bounds<'_>,
) -> Result<Outcome, QueryError> {
    let plan = plan(query);
    let counting = matches!(query.select, Select::Count { .. });
    let mut run = Run {
        graph,
        query,
        visible,
        plan: &plan,
        work: 0,
        max_work: bounds.max_work,
        max_page_bytes: bounds.max_page_bytes,
        expired: bounds.expired,
        scope_steps: bounds.scope_steps,
        charged_steps: 0,
        next_deadline_check: limits::DEADLINE_CHECK_UNITS,
        skips: 0,
        examined: 0,
        rows: 0,
        skip,
        take,
        counting,
        items: Vec::new(),
        page_bytes: 0,
        more: false,
        meter: Rc::default(),
        settled: (0, 0),
        docs: HashMap::new(),
        cached_bytes: 0,
    };
    let mut row = vec![Bound::Unbound; query.vars.len()];
    if query.top != Some(0) {
        run.seed(&mut row)?;
    }
    if let Select::Count { name } = &query.select
        && skip == 0
    {
        let mut object = serde_json::Map::new();
        object.insert(name.clone(), serde_json::Value::from(run.rows));
        let text = serde_json::to_string(&object).map_err(|_| QueryError::internal())?;
        run.page_bytes += text.len();
        run.items
            .push(RawValue::from_string(text).map_err(|_| QueryError::internal())?);
    }
    Ok(Outcome {
        more: run.more,
        examined: run.examined,
        parses: run.meter.parses.get(),
        parsed_bytes: run.meter.parsed_bytes.get(),
        page_bytes: u64::try_from(run.page_bytes).unwrap_or(u64::MAX),
        scope_steps: run.charged_steps,
        items: run.items,
    })
}

struct Run<'a> {
    graph: &'a Graph,
    query: &'a Query,
    visible: &'a dyn Fn(&Twin) -> bool,
    plan: &'a Plan<'a>,
    work: u64,
    max_work: u64,
    max_page_bytes: usize,
    expired: &'a dyn Fn() -> bool,
    scope_steps: &'a dyn Fn(&Twin) -> u64,
    /// The scope steps charged so far.
    charged_steps: u64,
    /// The work at which the deadline is asked next.
    next_deadline_check: u64,
    /// Entities skipped unseen (hidden twins and their relationships), which spend no work.
    skips: u64,
    examined: u64,
    /// Rows that passed every condition so far.
    rows: u64,
    skip: usize,
    take: usize,
    counting: bool,
    items: Vec<Box<RawValue>>,
    /// Serialized bytes of `items`.
    page_bytes: usize,
    more: bool,
    meter: Rc<Meter>,
    /// The parses and parsed bytes already charged to the work budget.
    settled: (u64, u64),
    /// Documents kept for the whole run, by the address of their twin or relationship (alive in
    /// `graph` for the run), up to [`limits::DOC_CACHE_BYTES`] of stored JSON.
    docs: HashMap<usize, Doc>,
    cached_bytes: usize,
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
        if self.work >= self.next_deadline_check {
            self.next_deadline_check = self.work.saturating_add(limits::DEADLINE_CHECK_UNITS);
            self.check_deadline()?;
        }
        Ok(())
    }

    fn check_deadline(&self) -> Result<(), QueryError> {
        if (self.expired)() {
            return Err(QueryError::deadline(
                "the query ran past its deadline; narrow it with a $dtId condition, fewer hops \
                 or a more selective WHERE",
            ));
        }
        Ok(())
    }

    /// Counts an entity skipped because the caller may not see it. It spends no work (hidden
    /// equals absent), but the deadline still bounds the time skipping takes.
    fn skip_unseen(&mut self) -> Result<(), QueryError> {
        self.skips += 1;
        if self.skips.is_multiple_of(limits::DEADLINE_CHECK_SKIPS) {
            self.check_deadline()?;
        }
        Ok(())
    }

    /// Charges the documents parsed since the last call to the work budget.
    fn settle_parses(&mut self) -> Result<(), QueryError> {
        let now = (self.meter.parses.get(), self.meter.parsed_bytes.get());
        let (parses, bytes) = (now.0 - self.settled.0, now.1 - self.settled.1);
        self.settled = now;
        if parses == 0 {
            return Ok(());
        }
        self.spend(
            parses
                .saturating_mul(limits::WORK_PER_PARSE)
                .saturating_add(bytes / limits::PARSED_BYTES_PER_UNIT),
        )
    }

    /// A binding of `twin` that shares the parsed document of another binding of the same twin
    /// in `row` or in the run's cache.
    fn bind_twin(&mut self, row: &[Bound<'a>], twin: &'a Arc<Twin>) -> Bound<'a> {
        let shared = row.iter().find_map(|b| match b {
            Bound::Twin(t, doc) if Arc::ptr_eq(t, twin) => Some(doc.clone()),
            _ => None,
        });
        let doc = self.shared_doc(shared, Arc::as_ptr(twin) as usize, twin.json());
        Bound::Twin(twin, doc)
    }

    /// [`Run::bind_twin`] for a relationship.
    fn bind_rel(&mut self, row: &[Bound<'a>], rel: &'a Arc<Relationship>) -> Bound<'a> {
        let shared = row.iter().find_map(|b| match b {
            Bound::Rel(r, doc) if Arc::ptr_eq(r, rel) => Some(doc.clone()),
            _ => None,
        });
        let doc = self.shared_doc(shared, Arc::as_ptr(rel) as usize, rel.json());
        Bound::Rel(rel, doc)
    }

    fn shared_doc(&mut self, in_row: Option<Doc>, key: usize, raw: &RawValue) -> Doc {
        if let Some(doc) = in_row.or_else(|| self.docs.get(&key).cloned()) {
            return doc;
        }
        let doc = Doc::new(&self.meter);
        let size = raw.get().len();
        if self.cached_bytes + size <= limits::DOC_CACHE_BYTES {
            self.cached_bytes += size;
            self.docs.insert(key, doc.clone());
        }
        doc
    }

    /// Counts one examined twin or relationship that the caller may see (or one ID the query
    /// names). Entities outside the caller's scopes are never counted: the charge, the work
    /// budget and so the `QueryLimitExceeded` answer depend only on what the caller sees, as if
    /// those entities were absent.
    fn examine(&mut self) -> Result<(), QueryError> {
        self.examined += 1;
        self.spend(limits::WORK_PER_ENTITY)
    }

    /// Charges the subtree-walk steps that place `twin`, a twin the run examines as visible, in
    /// the caller's scope. Only twins examined as visible are charged, in the order they are
    /// examined: a twin asked about only on the way to skipping something hidden (the visible
    /// end of a relationship to a hidden twin) is not, so the steps charged are those of a
    /// graph without the hidden entities.
    fn charge_scope(&mut self, twin: &Twin) -> Result<(), QueryError> {
        let steps = (self.scope_steps)(twin);
        if steps == 0 {
            return Ok(());
        }
        self.charged_steps = self.charged_steps.saturating_add(steps);
        self.spend(steps.saturating_mul(limits::WORK_PER_SCOPE_STEP))
    }

    /// [`Run::examine`] for a visible twin, with its scope steps.
    fn examine_twin(&mut self, twin: &Twin) -> Result<(), QueryError> {
        self.examine()?;
        self.charge_scope(twin)
    }

    /// Whether the caller may see `bound`, counting it as examined (and charging the scope
    /// steps of its twins) if so.
    fn examine_if_visible(&mut self, bound: &Bound<'a>) -> Result<bool, QueryError> {
        let visible = match bound {
            Bound::Twin(t, _) => self.twin_visible(t),
            Bound::Rel(r, _) => self.rel_visible(r),
            Bound::Unbound => false,
        };
        if !visible {
            self.skip_unseen()?;
            return Ok(false);
        }
        self.examine()?;
        match bound {
            Bound::Twin(t, _) => self.charge_scope(t)?,
            Bound::Rel(r, _) => {
                let graph = self.graph;
                for id in [&r.source, &r.target] {
                    if let Some(twin) = graph.twin(id) {
                        self.charge_scope(twin)?;
                    }
                }
            }
            Bound::Unbound => {}
        }
        Ok(true)
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
            let pass = eval(expr, row, self.graph).is_true();
            self.settle_parses()?;
            if !pass {
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
                    self.charge_scope(twin)?;
                    let bound = self.bind_twin(row, twin);
                    if self.bind_seed(row, *var, bound)? == Flow::Stop {
                        break;
                    }
                }
            }
            Seed::Twins { var, ids: None } => {
                for twin in graph.twins() {
                    let bound = self.bind_twin(row, twin);
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
                    let bound = self.bind_rel(row, rel);
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
                        let bound = self.bind_rel(row, rel);
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
                        let bound = self.bind_rel(row, rel);
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
                    let bound = self.bind_twin(row, twin);
                    set(row, step.to, bound);
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
                self.skip_unseen()?;
                continue;
            }
            self.examine_twin(twin)?;
            if !name_allowed(&step.edge.names, rel) {
                continue;
            }
            let bound = self.bind_twin(row, twin);
            set(row, step.to, bound);
            if let Some(rel_var) = step.edge.rel_var {
                let bound = self.bind_rel(row, rel);
                set(row, rel_var, bound);
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
                        self.skip_unseen()?;
                        continue;
                    }
                    self.examine_twin(twin)?;
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
        if self.rows >= self.skip as u64 {
            let mut text = Vec::new();
            project(self.query, row, &mut text).map_err(|_| QueryError::internal())?;
            self.settle_parses()?;
            self.spend(
                u64::try_from(text.len()).unwrap_or(u64::MAX) / limits::PAGE_BYTES_PER_UNIT,
            )?;
            // One comma between items.
            let added = text.len() + usize::from(!self.items.is_empty());
            if self.page_bytes + added > self.max_page_bytes {
                if self.items.is_empty() {
                    return Err(QueryError::work_limit(
                        "one result row is larger than a page may be; select fewer or smaller \
                         properties",
                    ));
                }
                // The row that does not fit starts the next page.
                self.more = true;
                return Ok(Flow::Stop);
            }
            let text = String::from_utf8(text).map_err(|_| QueryError::internal())?;
            self.items
                .push(RawValue::from_string(text).map_err(|_| QueryError::internal())?);
            self.page_bytes += added;
        }
        self.rows += 1;
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

/// Writes one result row as JSON. A whole twin or relationship is copied from its stored JSON
/// text (which is the serialization of its document), so it is neither parsed nor cloned; a
/// property is serialized from a reference into the shared document. Keys are written in the
/// order a JSON object map keeps them (sorted; a later column replaces an earlier one of the
/// same key), as the rows were before.
fn project(query: &Query, row: &[Bound<'_>], out: &mut Vec<u8>) -> serde_json::Result<()> {
    match &query.select {
        Select::Star if query.is_match => {
            let mut columns: BTreeMap<&str, Column<'_>> = BTreeMap::new();
            for (var, bound) in query.vars.iter().zip(row) {
                if let (Some(name), Some(raw)) = (&var.name, bound.raw()) {
                    columns.insert(name, Column::Raw(raw));
                }
            }
            write_object(columns, out)
        }
        Select::Star => {
            let var = match &query.source {
                Source::Twins { root, .. } => *root,
                Source::Relationships { var } => *var,
            };
            match row.get(var).and_then(Bound::raw) {
                Some(raw) => out.extend_from_slice(raw.get().as_bytes()),
                None => out.extend_from_slice(b"null"),
            }
            Ok(())
        }
        Select::Items(items) => {
            let mut columns: BTreeMap<&str, Column<'_>> = BTreeMap::new();
            for item in items {
                let Some(bound) = row.get(item.var) else {
                    continue;
                };
                let column = if item.path.is_empty() {
                    bound.raw().map(Column::Raw)
                } else {
                    match lookup(bound, &item.path) {
                        Val::Undefined => None,
                        value => Some(Column::Val(value)),
                    }
                };
                if let Some(column) = column {
                    columns.insert(&item.key, column);
                }
            }
            write_object(columns, out)
        }
        Select::Count { .. } => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// One value of a result row.
enum Column<'r> {
    Raw(&'r RawValue),
    Val(Val<'r>),
}

fn write_object(columns: BTreeMap<&str, Column<'_>>, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.push(b'{');
    for (i, (key, column)) in columns.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        match column {
            Column::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
            Column::Val(Val::Json(v)) => serde_json::to_writer(&mut *out, v)?,
            Column::Val(Val::Doc(m)) => serde_json::to_writer(&mut *out, m)?,
            Column::Val(Val::Bool(b)) => serde_json::to_writer(&mut *out, &b)?,
            Column::Val(Val::Undefined) => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
    Ok(())
}
