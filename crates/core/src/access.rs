//! Access decisions that depend on the twin graph: is this twin, relationship, model or route
//! inside a scope the caller holds an action at?
//!
//! Rules, chosen so that a scoped caller cannot read, infer or change anything outside its
//! scope through the twin API or queries:
//! - A twin outside every scope the caller reads at is reported exactly as an absent twin.
//! - A subtree is the root twin and every twin reachable from it along the named containment
//!   relationships. Membership is decided by walking *up* from the twin along incoming
//!   relationships with those names, which costs the twin's depth, not the subtree's size, and
//!   always reflects the snapshot the operation runs on.
//! - A relationship is inside a twin scope when both of its twins are; inside a relationship
//!   scope when its name is listed (its twins are then visible as endpoints, by design).
//! - Model scopes cover the model, the models that extend it, and their twins. Models are the
//!   ontology, not twin data: a subtree scope may read them.
//! - Creating a twin needs instance scope or a model scope covering its model: a new twin is in
//!   no subtree until a relationship links it, so subtree callers update what exists.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::auth::{Action, Principal, Scope};
use crate::dtmi::Dtmi;
use crate::error::{DomainError, DomainResult};
use crate::graph::{Graph, ModelEntry, Relationship, Twin, WriteOp};

/// Most twins visited when deciding subtree membership; beyond it the answer is "outside"
/// (deny by default), so a pathological graph cannot make one check unbounded.
const MAX_SUBTREE_WALK: usize = 100_000;

fn in_subtree(graph: &Graph, root: &str, names: &[String], twin: &str) -> bool {
    if twin == root {
        return true;
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack = vec![twin];
    while let Some(id) = stack.pop() {
        for rel in graph.incoming(id) {
            if !names.iter().any(|n| n.as_str() == &*rel.name) {
                continue;
            }
            let parent: &str = &rel.source;
            if parent == root {
                return true;
            }
            if seen.insert(parent) {
                if seen.len() > MAX_SUBTREE_WALK {
                    return false;
                }
                stack.push(parent);
            }
        }
    }
    false
}

/// What a walk up from a twin found.
enum Walk {
    /// A twin known to be inside was reached; the twins of the path back to the start, from
    /// the one next to it down to the start.
    Found(Vec<Arc<str>>),
    /// No twin known to be inside was reached; every twin visited.
    NotFound(Vec<Arc<str>>),
    /// The walk visited [`MAX_SUBTREE_WALK`] twins without an answer.
    CutShort,
}

/// Walks up from `twin` along incoming relationships named `names`, depth first, until it
/// reaches a twin `known` says is inside; twins it says are outside are not walked on. Each
/// relationship looked at adds one to `steps`.
///
/// Which path is found does not depend on twins outside the subtree: their ancestors are all
/// outside too, so walking them never reaches an inside twin, and no inside twin is reached
/// through them, so the inside twins are visited in the same order with or without them.
fn walk_up(
    graph: &Graph,
    names: &[String],
    twin: &Arc<str>,
    known: impl Fn(&str) -> Option<bool>,
    steps: &Cell<u64>,
) -> Walk {
    // Each visited twin with the twin it was reached from.
    let mut came_from: HashMap<Arc<str>, Option<Arc<str>>> = HashMap::new();
    came_from.insert(twin.clone(), None);
    let mut stack = vec![twin.clone()];
    while let Some(id) = stack.pop() {
        for rel in graph.incoming(&id) {
            if !names.iter().any(|n| n.as_str() == &*rel.name) {
                continue;
            }
            steps.set(steps.get() + 1);
            let parent = &rel.source;
            match known(parent) {
                Some(true) => {
                    let mut path = Vec::new();
                    let mut at = Some(id.clone());
                    while let Some(node) = at {
                        at = came_from.get(&node).cloned().flatten();
                        path.push(node);
                    }
                    return Walk::Found(path);
                }
                Some(false) => continue,
                None => {}
            }
            if !came_from.contains_key(parent) {
                if came_from.len() >= MAX_SUBTREE_WALK {
                    return Walk::CutShort;
                }
                came_from.insert(parent.clone(), Some(id.clone()));
                stack.push(parent.clone());
            }
        }
    }
    Walk::NotFound(came_from.into_keys().collect())
}

/// Subtree membership decided for one query, remembered so that each twin is walked from at
/// most once and a walk stops at the first twin already decided: a scan of a containment chain
/// of n twins takes O(n) steps, not O(n²).
///
/// A walk that reaches the root marks every twin on the path it found as inside; a walk that
/// ends without reaching it marks every twin it visited as outside (their upward closure holds
/// no path to the root).
///
/// Deciding is not charged: a query asks about twins it then skips as hidden (the far end of a
/// relationship from a visible twin to a hidden one is asked about before the relationship is
/// skipped), so what the decisions cost depends on what the scope hides. The work budget is
/// charged by [`ChargeMemo`] instead, for the twins the query examines as visible only.
struct SubtreeMemo {
    decided: HashMap<Arc<str>, bool>,
}

impl SubtreeMemo {
    fn contains(
        &mut self,
        graph: &Graph,
        root: &str,
        names: &[String],
        twin: &Arc<str>,
        steps: &Cell<u64>,
    ) -> bool {
        if &**twin == root {
            return true;
        }
        if let Some(known) = self.decided.get(twin) {
            return *known;
        }
        let decided = &self.decided;
        let known = |id: &str| {
            if id == root {
                Some(true)
            } else {
                decided.get(id).copied()
            }
        };
        match walk_up(graph, names, twin, known, steps) {
            Walk::Found(path) => {
                for node in path {
                    self.decided.insert(node, true);
                }
                true
            }
            Walk::NotFound(visited) => {
                for node in visited {
                    self.decided.insert(node, false);
                }
                false
            }
            // Deny by default, and decide nothing: the walk was cut short.
            Walk::CutShort => false,
        }
    }
}

/// The subtree-walk steps charged to one query's work budget, for one subtree grant.
///
/// A twin the query examines as visible is charged the steps of a path from it up to the root
/// or to a twin charged before, found by a walk that knows only the twins charged so far (and
/// skips twins already decided outside): one step per twin newly charged, so a scan of a
/// containment chain of n twins is charged n - 1 steps, whatever the order it examines them
/// in. What is charged depends only on the twins the query examines as visible, in the order it
/// examines them, and on the subtree itself, never on twins or relationships the caller may not
/// see: a query is charged the same as in a graph without them (hidden equals absent). Twins the
/// query asks about and skips as hidden, and the decision walks they cause, are not charged;
/// the query's deadline bounds them.
struct ChargeMemo {
    charged: HashSet<Arc<str>>,
}

impl ChargeMemo {
    fn charge(
        &mut self,
        graph: &Graph,
        root: &str,
        names: &[String],
        twin: &Arc<str>,
        decided: &HashMap<Arc<str>, bool>,
        steps: &Cell<u64>,
    ) -> u64 {
        if &**twin == root || self.charged.contains(twin) {
            return 0;
        }
        let charged = &self.charged;
        let known = |id: &str| {
            if id == root || charged.contains(id) {
                Some(true)
            } else if decided.get(id) == Some(&false) {
                Some(false)
            } else {
                None
            }
        };
        match walk_up(graph, names, twin, known, steps) {
            Walk::Found(path) => {
                let length = u64::try_from(path.len()).unwrap_or(u64::MAX);
                self.charged.extend(path);
                length
            }
            Walk::NotFound(_) | Walk::CutShort => 0,
        }
    }
}

/// One subtree grant's memos.
struct Memos {
    decide: SubtreeMemo,
    charge: ChargeMemo,
}

/// What one query by a scoped caller may see, decided once per twin and remembered for the
/// query, and the subtree-walk steps it is charged. Build one per query with
/// [`Principal::query_scope`].
pub struct QueryScope<'a> {
    principal: &'a Principal,
    graph: &'a Graph,
    /// One pair of memos per grant (subtree grants use theirs).
    memos: RefCell<Vec<Memos>>,
    decided: RefCell<HashMap<Arc<str>, bool>>,
    steps: Cell<u64>,
    charged: Cell<u64>,
}

impl QueryScope<'_> {
    /// Whether the caller may see `twin` in a query. Deciding it is not charged (see
    /// [`QueryScope::charge`]).
    pub fn visible(&self, twin: &Twin) -> bool {
        if let Some(known) = self.decided.borrow().get(&twin.id) {
            return *known;
        }
        let mut memos = self.memos.borrow_mut();
        let graph = self.graph;
        let seen = self
            .principal
            .grants
            .iter()
            .zip(memos.iter_mut())
            .any(|(grant, memos)| {
                grant.actions.contains(Action::Query)
                    && match &grant.scope {
                        Scope::Subtree {
                            root,
                            relationships,
                        } => {
                            memos
                                .decide
                                .contains(graph, root, relationships, &twin.id, &self.steps)
                        }
                        scope => scope.covers_twin(graph, twin),
                    }
            });
        self.decided.borrow_mut().insert(twin.id.clone(), seen);
        seen
    }

    /// The subtree-walk steps to charge the query's work budget for examining `twin`, a twin
    /// it may see (see [`ChargeMemo`]): the steps placing it in the subtree of the first grant
    /// that shows it, when that is a subtree grant and it was not charged before; else 0.
    pub fn charge(&self, twin: &Twin) -> u64 {
        let mut memos = self.memos.borrow_mut();
        let graph = self.graph;
        for (grant, memos) in self.principal.grants.iter().zip(memos.iter_mut()) {
            if !grant.actions.contains(Action::Query) {
                continue;
            }
            match &grant.scope {
                Scope::Subtree {
                    root,
                    relationships,
                } => {
                    let Memos { decide, charge } = memos;
                    if !decide.contains(graph, root, relationships, &twin.id, &self.steps) {
                        continue;
                    }
                    let steps = charge.charge(
                        graph,
                        root,
                        relationships,
                        &twin.id,
                        &decide.decided,
                        &self.steps,
                    );
                    self.charged.set(self.charged.get().saturating_add(steps));
                    return steps;
                }
                scope => {
                    if scope.covers_twin(graph, twin) {
                        return 0;
                    }
                }
            }
        }
        0
    }

    /// Relationship steps taken by subtree walks so far (deciding and charging), seen or not.
    pub fn walk_steps(&self) -> u64 {
        self.steps.get()
    }

    /// The steps charged so far by [`QueryScope::charge`]: what the query's work budget is
    /// charged for.
    pub fn charged_steps(&self) -> u64 {
        self.charged.get()
    }
}

impl Scope {
    fn covers_twin(&self, graph: &Graph, twin: &Twin) -> bool {
        match self {
            Scope::Instance => true,
            Scope::Model { model } => {
                Dtmi::parse(model).is_ok_and(|m| graph.is_of_model(twin, &m, false))
            }
            Scope::Subtree {
                root,
                relationships,
            } => in_subtree(graph, root, relationships, &twin.id),
            Scope::Relationships { .. } | Scope::EventRoutes { .. } => false,
        }
    }

    fn covers_twin_id(&self, graph: &Graph, id: &str) -> bool {
        graph.twin(id).is_some_and(|t| self.covers_twin(graph, t))
    }

    fn covers_relationship(&self, graph: &Graph, name: &str, source: &str, target: &str) -> bool {
        match self {
            Scope::Instance => true,
            Scope::Relationships { names } => names.iter().any(|n| n == name),
            Scope::Model { .. } | Scope::Subtree { .. } => {
                self.covers_twin_id(graph, source) && self.covers_twin_id(graph, target)
            }
            Scope::EventRoutes { .. } => false,
        }
    }

    fn covers_model(&self, entry: &ModelEntry) -> bool {
        match self {
            Scope::Instance | Scope::Subtree { .. } => true,
            Scope::Model { model } => Dtmi::parse(model).is_ok_and(|m| entry.interface.is_a(&m)),
            Scope::Relationships { .. } | Scope::EventRoutes { .. } => false,
        }
    }

    fn covers_new_twin(&self, graph: &Graph, model: &Dtmi) -> bool {
        match self {
            Scope::Instance => true,
            Scope::Model { model: m } => Dtmi::parse(m).is_ok_and(|m| {
                graph
                    .model(model)
                    .is_some_and(|entry| entry.interface.is_a(&m))
            }),
            _ => false,
        }
    }

    fn covers_route(&self, id: &str) -> bool {
        match self {
            Scope::Instance => true,
            Scope::EventRoutes { ids } => ids.iter().any(|i| i == id),
            _ => false,
        }
    }

    /// Twins this scope lets a relationship action see as endpoints.
    fn covers_endpoint(&self, graph: &Graph, twin: &Twin) -> bool {
        matches!(self, Scope::Relationships { .. }) || self.covers_twin(graph, twin)
    }
}

impl Principal {
    fn any_grant(&self, action: Action, covers: impl Fn(&Scope) -> bool) -> bool {
        self.holds_everywhere(action)
            || self
                .grants
                .iter()
                .any(|g| g.actions.contains(action) && covers(&g.scope))
    }

    pub fn may_twin(&self, graph: &Graph, action: Action, twin: &Twin) -> bool {
        self.any_grant(action, |s| s.covers_twin(graph, twin))
    }

    pub fn may_relationship(&self, graph: &Graph, action: Action, rel: &Relationship) -> bool {
        self.any_grant(action, |s| {
            s.covers_relationship(graph, &rel.name, &rel.source, &rel.target)
        })
    }

    pub fn may_model(&self, action: Action, entry: &ModelEntry) -> bool {
        self.any_grant(action, |s| s.covers_model(entry))
    }

    pub fn may_route(&self, action: Action, id: &str) -> bool {
        self.any_grant(action, |s| s.covers_route(id))
    }

    /// The caller may see `twin` as the endpoint of relationships it acts on with `action`.
    pub fn may_see_endpoint(&self, graph: &Graph, action: Action, twin: &Twin) -> bool {
        self.any_grant(action, |s| s.covers_endpoint(graph, twin))
    }

    /// What a query by this caller may see: twins inside a scope where it holds `Query`.
    /// `None` means everything (the fast path for unscoped callers).
    pub fn query_filter<'a>(&'a self, graph: &'a Graph) -> Option<impl Fn(&Twin) -> bool + 'a> {
        if self.holds_everywhere(Action::Query) {
            None
        } else {
            Some(move |t: &Twin| self.may_twin(graph, Action::Query, t))
        }
    }

    /// [`Principal::query_filter`] with the decisions remembered for one query and the subtree
    /// walks counted; `None` means everything.
    pub fn query_scope<'a>(&'a self, graph: &'a Graph) -> Option<QueryScope<'a>> {
        if self.holds_everywhere(Action::Query) {
            return None;
        }
        let memos = self
            .grants
            .iter()
            .map(|_| Memos {
                decide: SubtreeMemo {
                    decided: HashMap::new(),
                },
                charge: ChargeMemo {
                    charged: HashSet::new(),
                },
            })
            .collect();
        Some(QueryScope {
            principal: self,
            graph,
            memos: RefCell::new(memos),
            decided: RefCell::new(HashMap::new()),
            steps: Cell::new(0),
            charged: Cell::new(0),
        })
    }

    /// Looks up twin `id` for `action`: a twin outside the caller's scopes is reported as
    /// absent, one it can read but not act on as forbidden.
    pub fn twin_for<'g>(
        &self,
        graph: &'g Graph,
        action: Action,
        id: &str,
    ) -> DomainResult<&'g std::sync::Arc<Twin>> {
        let twin = graph
            .twin(id)
            .ok_or_else(|| DomainError::TwinNotFound(id.to_owned()))?;
        if self.may_twin(graph, action, twin) {
            Ok(twin)
        } else if self.may_twin(graph, Action::TwinsRead, twin) {
            Err(forbidden(action))
        } else {
            Err(hidden(DomainError::TwinNotFound(id.to_owned())))
        }
    }

    /// The twin whose relationships an action lists or changes; absent unless the caller may
    /// see it as an endpoint.
    pub fn source_for<'g>(
        &self,
        graph: &'g Graph,
        action: Action,
        id: &str,
    ) -> DomainResult<&'g std::sync::Arc<Twin>> {
        let twin = graph
            .twin(id)
            .ok_or_else(|| DomainError::TwinNotFound(id.to_owned()))?;
        if self.may_see_endpoint(graph, action, twin) {
            Ok(twin)
        } else {
            Err(hidden(DomainError::TwinNotFound(id.to_owned())))
        }
    }

    /// Decides a write on the snapshot it will apply to. Called by the writer, in order, for
    /// callers that do not hold the action instance-wide.
    pub(crate) fn check_write(&self, graph: &Graph, op: &WriteOp) -> DomainResult<()> {
        let action = op.action();
        match op {
            WriteOp::UploadModels(_) | WriteOp::AddCompiledModels(_) => {
                self.authorize_instance(action)
            }
            WriteOp::SetModelDecommissioned { id, .. } | WriteOp::DeleteModel(id) => {
                let entry = graph
                    .model(id)
                    .ok_or_else(|| DomainError::ModelNotFound(id.to_string()))?;
                if !self.may_model(Action::ModelsRead, entry) {
                    return Err(hidden(DomainError::ModelNotFound(id.to_string())));
                }
                allow(self.may_model(action, entry), action)
            }
            WriteOp::PutTwin { id, body, .. } => match graph.twin(id) {
                Some(existing)
                    if !self.may_twin(graph, action, existing)
                        && !self.may_twin(graph, Action::TwinsRead, existing) =>
                {
                    self.check_put_over_hidden_twin(graph, op, id)
                }
                _ => self.check_put_twin(graph, id, body),
            },
            WriteOp::PatchTwin { id, patch, .. } => {
                let twin = self.twin_for(graph, action, id)?;
                match patched_model(patch) {
                    ModelChange::None => Ok(()),
                    ModelChange::To(model) => allow(
                        self.any_grant(action, |s| {
                            s.covers_twin(graph, twin) && s.covers_new_twin(graph, &model)
                        }),
                        action,
                    ),
                    ModelChange::Unknown => Err(forbidden(action)),
                }
            }
            WriteOp::DeleteTwin { id, .. } => self.twin_for(graph, action, id).map(|_| ()),
            WriteOp::PutRelationship {
                source, id, body, ..
            } => {
                self.source_for(graph, action, source)?;
                if let Some(existing) = graph.relationship(source, id)
                    && !self.may_relationship(graph, action, existing)
                {
                    if self.may_relationship(graph, Action::RelationshipsRead, existing) {
                        return Err(forbidden(action));
                    }
                    return self.check_put_over_hidden(graph, op, source, id);
                }
                let field = |name: &str| body.get(name).and_then(Value::as_str).unwrap_or("");
                let (target, name) = (field("$targetId"), field("$relationshipName"));
                match graph.twin(target) {
                    None => return Err(DomainError::TargetTwinNotFound(target.to_owned())),
                    Some(t) if !self.may_see_endpoint(graph, action, t) => {
                        return Err(hidden(DomainError::TargetTwinNotFound(target.to_owned())));
                    }
                    Some(_) => {}
                }
                allow(
                    self.any_grant(action, |s| {
                        s.covers_relationship(graph, name, source, target)
                    }),
                    action,
                )
            }
            WriteOp::PatchRelationship { source, id, .. }
            | WriteOp::DeleteRelationship { source, id, .. } => {
                self.source_for(graph, action, source)?;
                let rel = graph
                    .relationship(source, id)
                    .ok_or_else(|| DomainError::RelationshipNotFound(id.clone()))?;
                if !self.may_relationship(graph, action, rel)
                    && !self.may_relationship(graph, Action::RelationshipsRead, rel)
                {
                    return Err(hidden(DomainError::RelationshipNotFound(id.clone())));
                }
                allow(self.may_relationship(graph, action, rel), action)
            }
            WriteOp::PutRoute { id, .. } | WriteOp::DeleteRoute(id) => {
                allow(self.may_route(action, id), action)
            }
            // The telemetry pipeline writes with instance scope; nobody narrower may.
            WriteOp::ApplyReadings { .. }
            | WriteOp::TrimFeed(_)
            | WriteOp::Refresh
            | WriteOp::Commit(_) => self.authorize_instance(action),
            WriteOp::PublishTelemetry(message) => {
                self.twin_for(graph, action, &message.twin).map(|_| ())
            }
        }
    }

    /// A PUT of relationship `id` from `source`, where that ID is held by a relationship the
    /// caller may not see. The answer is the one the caller would get if the ID were free
    /// (every access, precondition and validation refusal, decided on the graph without it),
    /// with one exception that no answer can avoid: where that PUT would create the
    /// relationship, it is refused as an out-of-scope write, because creating it would replace
    /// the hidden one. So the caller learns that the ID is taken, and nothing about what holds
    /// it, as with a taken twin ID; the hidden relationship is never changed.
    fn check_put_over_hidden(
        &self,
        graph: &Graph,
        op: &WriteOp,
        source: &str,
        id: &str,
    ) -> DomainResult<()> {
        let mut without = graph.clone();
        without.remove_relationship(source, id, &mut Vec::new());
        // The relationship is gone from `without`, so this does not come back here.
        self.check_write(&without, op)?;
        op.clone().dry_run(&without)?;
        Err(hidden(forbidden(op.action())))
    }

    /// A PUT of twin `id` where a twin the caller may not see holds that ID: answered as if
    /// the ID were free, except that a PUT that would create the twin is refused as an
    /// out-of-scope write (see [`Principal::check_put_over_hidden`]).
    fn check_put_over_hidden_twin(
        &self,
        graph: &Graph,
        op: &WriteOp,
        id: &str,
    ) -> DomainResult<()> {
        let mut without = graph.clone();
        let mut scratch = Vec::new();
        let touching: Vec<(String, String)> = graph
            .outgoing(id)
            .chain(graph.incoming(id))
            .map(|r| (r.source.to_string(), r.id.to_string()))
            .collect();
        for (source, rel) in touching {
            without.remove_relationship(&source, &rel, &mut scratch);
        }
        without.remove_twin(id, &mut scratch);
        // The twin is gone from `without`, so this does not come back here.
        self.check_write(&without, op)?;
        op.clone().dry_run(&without)?;
        Err(hidden(forbidden(op.action())))
    }

    fn check_put_twin(
        &self,
        graph: &Graph,
        id: &str,
        body: &Map<String, Value>,
    ) -> DomainResult<()> {
        let action = Action::TwinsWrite;
        let model = body
            .get("$metadata")
            .and_then(|m| m.get("$model"))
            .and_then(Value::as_str)
            .and_then(|m| Dtmi::parse(m).ok());
        let existing = graph.twin(id);
        let allowed = self.any_grant(action, |s| {
            match (existing, &model) {
                // A replaced twin keeps its relationships, so subtree membership holds.
                (Some(t), Some(m)) => {
                    s.covers_twin(graph, t)
                        && (matches!(s, Scope::Subtree { .. }) || s.covers_new_twin(graph, m))
                }
                (None, Some(m)) => s.covers_new_twin(graph, m),
                // No readable model: the write will be refused by validation; only an
                // unscoped caller gets that far, so scoped callers learn nothing from it.
                (_, None) => false,
            }
        });
        // A taken ID outside the caller's scope is refused like any other out-of-scope write;
        // twin IDs share one namespace, so a caller allowed to create twins can learn that an
        // ID is taken (ADT behaves the same).
        allow(allowed, action)
    }
}

enum ModelChange {
    None,
    To(Dtmi),
    /// The patch moves or copies something into `$model`, or names no valid model.
    Unknown,
}

/// Whether a JSON Patch changes the twin's model, and to what.
fn patched_model(patch: &Value) -> ModelChange {
    let Some(ops) = patch.as_array() else {
        return ModelChange::None;
    };
    let mut change = ModelChange::None;
    for op in ops {
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        if !path.starts_with("/$metadata/$model") {
            continue;
        }
        change = match (
            op.get("op").and_then(Value::as_str),
            op.get("value").and_then(Value::as_str),
        ) {
            (Some("add" | "replace"), Some(v)) => match Dtmi::parse(v) {
                Ok(m) => ModelChange::To(m),
                Err(_) => ModelChange::Unknown,
            },
            (Some("test"), _) => continue,
            _ => ModelChange::Unknown,
        };
    }
    change
}

/// An existing resource outside the caller's scopes, answered as `absent`.
pub(crate) fn hidden(absent: DomainError) -> DomainError {
    DomainError::Hidden(Box::new(absent))
}

fn forbidden(action: Action) -> DomainError {
    DomainError::Forbidden {
        action: action.as_str(),
    }
}

fn allow(allowed: bool, action: Action) -> DomainResult<()> {
    if allowed {
        Ok(())
    } else {
        Err(forbidden(action))
    }
}
