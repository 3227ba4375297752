//! The write operations on the graph and their rules. Each operation checks its preconditions
//! against the current snapshot, changes a working copy, and records the store mutations; the
//! service commits them durably before the new snapshot is published.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::Graph;
use super::types::{EventRoute, ModelEntry, Relationship, Twin};
use super::validate::{
    check_endpoint_name, check_id, check_relationship_properties, check_route_id,
    check_twin_contents,
};
use crate::auth::Action;
use crate::dtdl::{self, Interface, ParseOptions};
use crate::dtmi::Dtmi;
use crate::error::{DomainError, DomainResult};
use crate::feed::{self, Change, FeedState};
use crate::routes;
use crate::store::{Mutation, Owner};

/// Most models one upload may carry (ADT's limit).
pub const MAX_MODELS_PER_UPLOAD: usize = 250;
/// Most models an instance holds (ADT's limit is 10,000).
pub const MAX_MODELS: usize = 10_000;
/// Most entries the stored models' compiled forms may hold together, in the units of
/// `Interface::expanded_size` (the 767 RealEstateCore interfaces take 16,566). Start-up compiles
/// the stored models again, so this also bounds the work of a start-up (`docs/dtdl.md`).
pub const MAX_STORED_EXPANSION: usize = 2_000_000;
/// Most outgoing relationships of one twin (ADT's limit).
pub const MAX_OUTGOING_RELATIONSHIPS: usize = 5_000;
/// Most event routes an instance holds (ADT's limit is 6).
pub const MAX_ROUTES: usize = 64;

/// A precondition on the entity's current etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match`: the entity exists and its etag matches (`*` matches any).
    IfMatch(String),
    /// `If-None-Match: *`: the entity does not exist yet.
    IfNoneMatch,
}

impl Precondition {
    fn check(&self, current: Option<&str>) -> DomainResult<()> {
        match (self, current) {
            // `If-Match` may list several etags (RFC 9110 13.1.1); any one matching is enough.
            (Precondition::IfMatch(tags), Some(etag))
                if tags
                    .split(',')
                    .map(str::trim)
                    .any(|t| t == "*" || t == etag) =>
            {
                Ok(())
            }
            (Precondition::IfMatch(_), _) => Err(DomainError::PreconditionFailed),
            (Precondition::IfNoneMatch, Some(_)) => Err(DomainError::PreconditionFailed),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WriteOp {
    UploadModels(Vec<Value>),
    /// An upload compiled before it was queued (see `TwinService::submit`); only this crate
    /// makes one.
    AddCompiledModels(CompiledModels),
    SetModelDecommissioned {
        id: Dtmi,
        decommissioned: bool,
    },
    DeleteModel(Dtmi),
    PutTwin {
        id: String,
        body: Map<String, Value>,
        precondition: Precondition,
    },
    PatchTwin {
        id: String,
        component: Option<String>,
        patch: Value,
        precondition: Precondition,
    },
    DeleteTwin {
        id: String,
        precondition: Precondition,
    },
    PutRelationship {
        source: String,
        id: String,
        body: Map<String, Value>,
        precondition: Precondition,
    },
    PatchRelationship {
        source: String,
        id: String,
        patch: Value,
        precondition: Precondition,
    },
    DeleteRelationship {
        source: String,
        id: String,
        precondition: Precondition,
    },
    PutRoute {
        id: String,
        endpoint_name: String,
        filter: String,
    },
    DeleteRoute(String),
    /// The telemetry pipeline's decisions for twin properties, committed with the records that
    /// go with them (see [`super::readings`]).
    ApplyReadings {
        updates: Vec<super::readings::PropertyUpdate>,
        records: Vec<Mutation>,
    },
    /// A telemetry message sent to a twin (ADT's `POST /digitaltwins/{id}/telemetry`): it
    /// changes nothing but the change feed.
    PublishTelemetry(TelemetryMessage),
    /// Deletes delivered records from the change feed; only the service makes one.
    TrimFeed(FeedTrim),
    /// Changes nothing: wakes the writer so that it reads what other writers sharing the store
    /// committed (`TwinService::follow`); only the service makes one.
    Refresh,
    /// Another owner's records (identity, tokens, event delivery), committed in the writer's
    /// groups; made only by a `service::Door`.
    Commit(OwnedRecords),
}

/// Records of one owner, for [`WriteOp::Commit`].
#[derive(Debug, Clone)]
pub struct OwnedRecords {
    pub(crate) owner: Owner,
    pub(crate) records: Vec<Mutation>,
}

/// Refuses records outside `owner`'s tables, and any through this path for the graph (whose
/// tables change only through its own operations).
pub(crate) fn check_owned(owner: Owner, records: &[Mutation]) -> DomainResult<()> {
    match records
        .iter()
        .find(|r| owner == Owner::Graph || r.table.owner() != owner)
    {
        None => Ok(()),
        Some(record) => {
            tracing::error!(owner = ?owner, table = record.table.name(), "a commit carried a record outside its owner's tables; refused");
            Err(DomainError::Internal(
                "a commit carried a record outside its owner's tables",
            ))
        }
    }
}

/// A telemetry message for [`WriteOp::PublishTelemetry`].
#[derive(Debug, Clone)]
pub struct TelemetryMessage {
    pub twin: String,
    /// The component it is sent to, if any.
    pub component: Option<String>,
    /// The sender's `Message-Id`: a repeat of one seen in the last hour is acknowledged and
    /// not published again.
    pub message_id: String,
    /// The sender's `Telemetry-Source-Time`, RFC 3339.
    pub source_time: Option<String>,
    pub body: Value,
}

/// A trim of the change feed; made only by the service (`TwinService::trim_feed`).
#[derive(Debug, Clone)]
pub struct FeedTrim {
    pub(crate) below: u64,
}

#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Models(Vec<Arc<ModelEntry>>),
    Twin(Arc<Twin>),
    Relationship(Arc<Relationship>),
    Route(Arc<EventRoute>),
    /// One answer per update of [`WriteOp::ApplyReadings`], in order.
    Readings(Vec<Result<(), super::readings::Skipped>>),
    Done,
}

impl WriteOutcome {
    pub fn into_twin(self) -> DomainResult<Arc<Twin>> {
        match self {
            Self::Twin(twin) => Ok(twin),
            _ => Err(DomainError::Internal("a twin write produced no twin")),
        }
    }

    pub fn into_relationship(self) -> DomainResult<Arc<Relationship>> {
        match self {
            Self::Relationship(rel) => Ok(rel),
            _ => Err(DomainError::Internal(
                "a relationship write produced no relationship",
            )),
        }
    }

    pub fn into_models(self) -> DomainResult<Vec<Arc<ModelEntry>>> {
        match self {
            Self::Models(models) => Ok(models),
            _ => Err(DomainError::Internal("a model upload produced no models")),
        }
    }
}

impl WriteOp {
    /// The data action a caller needs for this operation.
    pub fn action(&self) -> Action {
        match self {
            Self::UploadModels(_)
            | Self::AddCompiledModels(_)
            | Self::SetModelDecommissioned { .. } => Action::ModelsWrite,
            Self::DeleteModel(_) => Action::ModelsDelete,
            Self::PutTwin { .. } | Self::PatchTwin { .. } => Action::TwinsWrite,
            Self::DeleteTwin { .. } => Action::TwinsDelete,
            Self::PutRelationship { .. } | Self::PatchRelationship { .. } => {
                Action::RelationshipsWrite
            }
            Self::DeleteRelationship { .. } => Action::RelationshipsDelete,
            Self::PutRoute { .. } => Action::EventRoutesWrite,
            Self::DeleteRoute(_) => Action::EventRoutesDelete,
            Self::ApplyReadings { .. } => Action::TelemetryWrite,
            Self::PublishTelemetry(_) => Action::TwinsWrite,
            Self::TrimFeed(_) => Action::EventRoutesDelete,
            Self::Refresh => Action::TwinsRead,
            Self::Commit(_) => Action::KeysWrite,
        }
    }

    /// The answer [`WriteOp::apply`] would give on `graph`, changing nothing.
    pub(crate) fn dry_run(self, graph: &Graph) -> DomainResult<WriteOutcome> {
        self.apply(
            &mut graph.clone(),
            &WriteContext::default(),
            &mut Vec::new(),
        )
    }

    /// Applies the operation to `graph`, recording store mutations in `muts` and what it
    /// changed in `ctx.changes` (the change feed).
    ///
    /// Every operation makes all its checks before its first change, so an error leaves `graph`
    /// and `muts` untouched; the writer relies on this instead of copying the graph per write.
    pub(crate) fn apply(
        self,
        graph: &mut Graph,
        ctx: &WriteContext,
        muts: &mut Vec<Mutation>,
    ) -> DomainResult<WriteOutcome> {
        let before = Before::of(&self, graph);
        let outcome = self.apply_op(graph, ctx, muts)?;
        if let Some(change) = before.change(graph, &outcome) {
            ctx.changes.borrow_mut().push(change);
        }
        Ok(outcome)
    }

    fn apply_op(
        self,
        graph: &mut Graph,
        ctx: &WriteContext,
        muts: &mut Vec<Mutation>,
    ) -> DomainResult<WriteOutcome> {
        match self {
            Self::UploadModels(docs) => {
                let compiled = compile_upload(graph, docs)?;
                add_models(graph, compiled, ctx, muts)
            }
            Self::AddCompiledModels(compiled) => add_models(graph, compiled, ctx, muts),
            Self::SetModelDecommissioned { id, decommissioned } => {
                let entry = graph
                    .model(&id)
                    .ok_or_else(|| DomainError::ModelNotFound(id.to_string()))?;
                let entry = Arc::new(ModelEntry {
                    decommissioned,
                    ..(**entry).clone()
                });
                graph.put_model(entry, muts);
                Ok(WriteOutcome::Done)
            }
            Self::DeleteModel(id) => delete_model(graph, &id, muts),
            Self::PutTwin {
                id,
                body,
                precondition,
            } => put_twin(graph, id, body, &precondition, ctx, muts),
            Self::PatchTwin {
                id,
                component,
                patch,
                precondition,
            } => patch_twin(
                graph,
                &id,
                component.as_deref(),
                &patch,
                &precondition,
                ctx,
                muts,
            ),
            Self::DeleteTwin { id, precondition } => {
                let twin = graph
                    .twin(&id)
                    .ok_or_else(|| DomainError::TwinNotFound(id.clone()))?;
                precondition.check(Some(&twin.etag))?;
                if graph.outgoing(&id).next().is_some() || graph.incoming(&id).next().is_some() {
                    return Err(DomainError::RelationshipsExist(id));
                }
                graph.remove_twin(&id, muts);
                Ok(WriteOutcome::Done)
            }
            Self::PutRelationship {
                source,
                id,
                body,
                precondition,
            } => put_relationship(graph, source, id, body, &precondition, ctx, muts),
            Self::PatchRelationship {
                source,
                id,
                patch,
                precondition,
            } => patch_relationship(graph, &source, &id, &patch, &precondition, ctx, muts),
            Self::DeleteRelationship {
                source,
                id,
                precondition,
            } => {
                let rel = graph
                    .relationship(&source, &id)
                    .ok_or_else(|| DomainError::RelationshipNotFound(id.clone()))?;
                precondition.check(Some(&rel.etag))?;
                graph.remove_relationship(&source, &id, muts);
                Ok(WriteOutcome::Done)
            }
            Self::PutRoute {
                id,
                endpoint_name,
                filter,
            } => {
                check_route_id(&id)?;
                check_endpoint_name(&endpoint_name)?;
                routes::check_filter(&filter)?;
                if graph.route(&id).is_none() && graph.routes.len() >= MAX_ROUTES {
                    return Err(DomainError::InvalidArgument(format!(
                        "an instance holds at most {MAX_ROUTES} event routes"
                    )));
                }
                let route = Arc::new(EventRoute {
                    id,
                    endpoint_name,
                    filter,
                });
                graph.put_route(route.clone(), muts);
                Ok(WriteOutcome::Route(route))
            }
            Self::DeleteRoute(id) => {
                if graph.route(&id).is_none() {
                    return Err(DomainError::RouteNotFound(id));
                }
                graph.remove_route(&id, muts);
                Ok(WriteOutcome::Done)
            }
            Self::ApplyReadings { updates, records } => {
                super::readings::check_records(&records)?;
                Ok(WriteOutcome::Readings(super::readings::apply(
                    graph, updates, records, ctx, muts,
                )))
            }
            Self::PublishTelemetry(message) => publish_telemetry(graph, message, ctx),
            Self::Commit(OwnedRecords { owner, records }) => {
                check_owned(owner, &records)?;
                muts.extend(records);
                Ok(WriteOutcome::Done)
            }
            Self::TrimFeed(trim) => {
                ctx.feed.borrow_mut().trim(trim.below, muts);
                Ok(WriteOutcome::Done)
            }
            Self::Refresh => Ok(WriteOutcome::Done),
        }
    }
}

/// What every write in one commit shares: its time and a source of fresh etags. The writer
/// keeps one for its lifetime, so that what it learns in one commit (the twin documents it
/// parsed) serves the next.
#[derive(Debug, Default)]
pub struct WriteContext {
    /// RFC 3339 time of the commit.
    pub now: String,
    /// The same time in Unix seconds.
    pub unix_now: i64,
    /// Twin documents that telemetry writes left parsed (see [`super::readings::ParsedTwins`]).
    pub(crate) parsed: std::cell::RefCell<super::readings::ParsedTwins>,
    /// What the writes of the group being built changed, for the change feed.
    pub(crate) changes: std::cell::RefCell<Vec<Change>>,
    /// The change feed's position (the writer's; a dry run has a blank one).
    pub(crate) feed: std::cell::RefCell<FeedState>,
}

impl WriteContext {
    pub(crate) fn new_etag(&self) -> String {
        format!("W/\"{}\"", uuid::Uuid::new_v4())
    }
}

/// A model upload compiled against a snapshot, waiting to be added by the writer.
#[derive(Debug, Clone)]
pub struct CompiledModels {
    docs: Vec<Value>,
    interfaces: Vec<Arc<Interface>>,
    /// The stored models the compilation used, as it found them.
    used: Vec<Arc<Interface>>,
}

/// Sum of the stored models' `expanded_size`.
fn stored_expansion(graph: &Graph) -> usize {
    graph
        .models()
        .map(|m| m.interface.expanded_size)
        .fold(0, usize::saturating_add)
}

/// Compiles an upload against `graph`, changing nothing: the costly part of an upload, which
/// the service runs before the upload enters the writer's queue.
pub(crate) fn compile_upload(graph: &Graph, docs: Vec<Value>) -> DomainResult<CompiledModels> {
    if docs.is_empty() {
        return Err(DomainError::InvalidArgument(
            "the request holds no models".into(),
        ));
    }
    if docs.len() > MAX_MODELS_PER_UPLOAD {
        return Err(DomainError::InvalidArgument(format!(
            "one upload holds at most {MAX_MODELS_PER_UPLOAD} models"
        )));
    }
    if graph.models.len() + docs.len() > MAX_MODELS {
        return Err(DomainError::InvalidArgument(format!(
            "an instance holds at most {MAX_MODELS} models"
        )));
    }
    for doc in &docs {
        if !doc.is_object() {
            return Err(DomainError::InvalidArgument(
                "each model must be a JSON object".into(),
            ));
        }
    }
    let used = std::cell::RefCell::new(Vec::new());
    let resolve = |id: &Dtmi| {
        let found = graph.model(id).map(|m| m.interface.clone());
        if let Some(i) = &found {
            used.borrow_mut().push(i.clone());
        }
        found
    };
    let compiled = dtdl::compile(
        &docs,
        &resolve,
        &ParseOptions::strict(),
        dtdl::DEFAULT_WORK_LIMIT,
    )?;
    let mut used = used.into_inner();
    used.sort_by(|a, b| a.id.cmp(&b.id));
    used.dedup_by(|a, b| a.id == b.id);
    Ok(CompiledModels {
        docs,
        interfaces: compiled.interfaces,
        used,
    })
}

/// Adds compiled models once the graph they were compiled against is known to be the one they
/// enter, as far as they depend on it: every stored model they used is still there, unchanged.
/// Costs time in the number of models, not in their size.
fn add_models(
    graph: &mut Graph,
    compiled: CompiledModels,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> DomainResult<WriteOutcome> {
    let CompiledModels {
        docs,
        interfaces,
        used,
    } = compiled;
    if graph.models.len() + interfaces.len() > MAX_MODELS {
        return Err(DomainError::InvalidArgument(format!(
            "an instance holds at most {MAX_MODELS} models"
        )));
    }
    for dep in &used {
        if !graph
            .model(&dep.id)
            .is_some_and(|m| Arc::ptr_eq(&m.interface, dep))
        {
            return Err(DomainError::Dtdl(dtdl::DtdlError::new(format!(
                "'{}' was deleted while the upload was compiled",
                dep.id
            ))));
        }
    }
    let mut seen = BTreeSet::new();
    for iface in &interfaces {
        if graph.model(&iface.id).is_some() || !seen.insert(iface.id.clone()) {
            return Err(DomainError::ModelExists(iface.id.to_string()));
        }
    }
    let added = interfaces
        .iter()
        .map(|i| i.expanded_size)
        .fold(0, usize::saturating_add);
    if stored_expansion(graph).saturating_add(added) > MAX_STORED_EXPANSION {
        return Err(DomainError::InvalidArgument(format!(
            "the instance's models would expand to more than {MAX_STORED_EXPANSION} entries"
        )));
    }
    let mut entries = Vec::with_capacity(interfaces.len());
    for (definition, interface) in docs.into_iter().zip(interfaces) {
        let entry = Arc::new(ModelEntry {
            id: interface.id.clone(),
            definition,
            upload_time: ctx.now.clone(),
            decommissioned: false,
            interface,
        });
        graph.put_model(entry.clone(), muts);
        entries.push(entry);
    }
    Ok(WriteOutcome::Models(entries))
}

/// The models and twins that depend on `id`; a model is deleted only when nothing does.
fn delete_model(
    graph: &mut Graph,
    id: &Dtmi,
    muts: &mut Vec<Mutation>,
) -> DomainResult<WriteOutcome> {
    if graph.model(id).is_none() {
        return Err(DomainError::ModelNotFound(id.to_string()));
    }
    if let Some(dependent) = graph
        .models()
        .find(|m| &m.id != id && depends_on(&m.interface, id))
    {
        return Err(DomainError::ModelReferenced(
            id.to_string(),
            format!("model {}", dependent.id),
        ));
    }
    if let Some(twin) = graph.twins().find(|t| &t.model == id) {
        return Err(DomainError::ModelReferenced(
            id.to_string(),
            format!("twin '{}'", twin.id),
        ));
    }
    graph.remove_model(id, muts);
    Ok(WriteOutcome::Done)
}

/// True when `iface` extends `id` or uses it as a component schema, directly or not.
pub(crate) fn depends_on(iface: &Interface, id: &Dtmi) -> bool {
    iface.ancestors.contains(id)
        || iface
            .components
            .values()
            .any(|c| c.schema.is_a(id) || depends_on(&c.schema, id))
}

fn interface_for<'g>(graph: &'g Graph, model: &Dtmi) -> DomainResult<&'g Arc<ModelEntry>> {
    graph.model(model).ok_or_else(|| {
        DomainError::ValidationFailed(format!("model {model} has not been uploaded"))
    })
}

fn model_of(body: &Map<String, Value>) -> DomainResult<Dtmi> {
    let raw = body
        .get("$metadata")
        .and_then(|m| m.get("$model"))
        .and_then(Value::as_str)
        .ok_or_else(|| DomainError::ValidationFailed("$metadata.$model is required".into()))?;
    Dtmi::parse(raw).map_err(|e| DomainError::ValidationFailed(e.to_string()))
}

fn put_twin(
    graph: &mut Graph,
    id: String,
    mut body: Map<String, Value>,
    precondition: &Precondition,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> DomainResult<WriteOutcome> {
    check_id("twin", &id)?;
    let existing = graph.twin(&id).cloned();
    precondition.check(existing.as_ref().map(|t| t.etag.as_str()))?;
    if let Some(given) = body.get("$dtId")
        && given.as_str() != Some(id.as_str())
    {
        return Err(DomainError::ValidationFailed(
            "$dtId does not match the twin ID in the path".into(),
        ));
    }
    let model = model_of(&body)?;
    let entry = interface_for(graph, &model)?;
    if entry.decommissioned && existing.as_ref().is_none_or(|t| t.model != model) {
        return Err(DomainError::ModelDecommissioned(model.to_string()));
    }
    let iface = entry.interface.clone();
    check_twin_contents(&iface, &body, "")?;
    // Relationships that exist must still fit the new model.
    if let Some(old) = &existing
        && old.model != model
    {
        check_relationships_still_fit(graph, &id, &iface)?;
    }
    let requested_meta = take_metadata(&mut body);
    check_all_source_times(&requested_meta, &body, &iface)?;
    body.remove("$dtId");
    body.remove("$etag");
    let doc = assemble_twin(
        &id,
        &ctx.new_etag(),
        &model,
        body,
        &requested_meta,
        existing.as_deref(),
        &iface,
        &ctx.now,
    );
    let twin = Arc::new(twin_from_parts(doc)?);
    graph.put_twin(twin.clone(), muts);
    Ok(WriteOutcome::Twin(twin))
}

fn check_relationships_still_fit(graph: &Graph, id: &str, iface: &Interface) -> DomainResult<()> {
    for rel in graph.outgoing(id) {
        if !iface.relationships.contains_key(rel.name.as_ref()) {
            return Err(DomainError::ValidationFailed(format!(
                "relationship '{}' is not defined by model {}; delete it first",
                rel.id, iface.id
            )));
        }
    }
    Ok(())
}

/// `sourceTime` values in a twin's (or component's) `$metadata` must be RFC 3339 date-times;
/// components carry their own `$metadata`, checked when the component is assembled.
fn check_source_times(metadata: &Map<String, Value>, at: &str) -> DomainResult<()> {
    for (name, entry) in metadata {
        let Some(time) = entry.get("sourceTime") else {
            continue;
        };
        let valid = time.as_str().is_some_and(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok()
        });
        if !valid {
            return Err(DomainError::ValidationFailed(format!(
                "$metadata.{at}{name}.sourceTime must be an RFC 3339 date-time"
            )));
        }
    }
    Ok(())
}

/// [`check_source_times`] for a twin's own `$metadata` and each component's.
fn check_all_source_times(
    metadata: &Map<String, Value>,
    body: &Map<String, Value>,
    iface: &Interface,
) -> DomainResult<()> {
    check_source_times(metadata, "")?;
    for name in iface.components.keys() {
        if let Some(Value::Object(inner)) = body.get(name).and_then(|c| c.get("$metadata")) {
            check_source_times(inner, &format!("{name}."))?;
        }
    }
    Ok(())
}

fn take_metadata(body: &mut Map<String, Value>) -> Map<String, Value> {
    match body.remove("$metadata") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn twin_from_parts(doc: Map<String, Value>) -> DomainResult<Twin> {
    // assemble_twin always writes $dtId, $etag and $metadata.$model.
    Twin::from_doc(&doc).ok_or_else(|| DomainError::ValidationFailed("malformed twin".into()))
}

/// Builds a twin's wire form with `$metadata`: the model, the twin's last update time, and per
/// property `lastUpdateTime` (kept from `previous` when the value did not change) and
/// `sourceTime` (as requested, else kept).
#[allow(clippy::too_many_arguments)] // one call site per write path; a struct would only rename them
fn assemble_twin(
    id: &str,
    etag: &str,
    model: &Dtmi,
    contents: Map<String, Value>,
    requested_meta: &Map<String, Value>,
    previous: Option<&Twin>,
    iface: &Interface,
    now: &str,
) -> Map<String, Value> {
    let previous_doc = previous.map(Twin::doc);
    let previous_doc = previous_doc.as_ref();
    let mut doc = Map::new();
    doc.insert("$dtId".into(), Value::String(id.to_owned()));
    doc.insert("$etag".into(), Value::String(etag.to_owned()));
    let mut metadata = Map::new();
    metadata.insert("$model".into(), Value::String(model.to_string()));
    metadata.insert("$lastUpdateTime".into(), Value::String(now.to_owned()));
    for (name, value) in contents {
        if let (Some(component), Value::Object(inner)) = (iface.components.get(&name), &value) {
            let mut inner = inner.clone();
            let inner_requested = take_metadata(&mut inner);
            let inner_previous = previous_doc
                .and_then(|d| d.get(&name))
                .and_then(Value::as_object);
            let inner_meta = property_metadata(
                &inner,
                &inner_requested,
                inner_previous,
                &component.schema,
                now,
            );
            inner.insert("$metadata".into(), Value::Object(inner_meta));
            doc.insert(name, Value::Object(inner));
        } else {
            doc.insert(name, value);
        }
    }
    let prop_meta = property_metadata(&doc, requested_meta, previous_doc, iface, now);
    metadata.extend(prop_meta);
    doc.insert("$metadata".into(), Value::Object(metadata));
    doc
}

fn property_metadata(
    contents: &Map<String, Value>,
    requested: &Map<String, Value>,
    previous: Option<&Map<String, Value>>,
    iface: &Interface,
    now: &str,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in contents {
        if !iface.properties.contains_key(name) {
            continue;
        }
        let old_meta = previous
            .and_then(|p| p.get("$metadata"))
            .and_then(|m| m.get(name));
        let unchanged = previous.and_then(|p| p.get(name)) == Some(value);
        let mut meta = Map::new();
        let last = match (unchanged, old_meta.and_then(|m| m.get("lastUpdateTime"))) {
            (true, Some(t)) => t.clone(),
            _ => Value::String(now.to_owned()),
        };
        meta.insert("lastUpdateTime".into(), last);
        let source_time = requested
            .get(name)
            .and_then(|m| m.get("sourceTime"))
            .or_else(|| old_meta.and_then(|m| m.get("sourceTime")));
        if let Some(t) = source_time {
            meta.insert("sourceTime".into(), t.clone());
        }
        // Quality and sources are the telemetry pipeline's to set (see `readings`): a value a
        // client writes carries none, an untouched one keeps what it had.
        if unchanged && let Some(old) = old_meta {
            for key in ["quality", "sources"] {
                if let Some(v) = old.get(key) {
                    meta.insert(key.into(), v.clone());
                }
            }
        }
        out.insert(name.clone(), Value::Object(meta));
    }
    out
}

/// Checks a JSON Patch document: an array of `add`, `replace` and `remove` operations, as ADT
/// accepts, none of which touches `$dtId` or `$etag`.
fn parse_patch(patch: &Value) -> DomainResult<json_patch::Patch> {
    let parsed: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| {
        DomainError::InvalidArgument(format!("the body is not a valid JSON Patch: {e}"))
    })?;
    for op in &parsed.0 {
        let path = match op {
            json_patch::PatchOperation::Add(o) => &o.path,
            json_patch::PatchOperation::Replace(o) => &o.path,
            json_patch::PatchOperation::Remove(o) => &o.path,
            _ => {
                return Err(DomainError::InvalidArgument(
                    "only add, replace and remove operations are supported".into(),
                ));
            }
        };
        let path = path.as_str();
        if path.is_empty() || path == "/$dtId" || path == "/$etag" || path == "/$metadata" {
            return Err(DomainError::InvalidArgument(format!(
                "the path '{path}' cannot be patched"
            )));
        }
    }
    Ok(parsed)
}

/// The editable view of a twin: its contents plus `$metadata` holding `$model` and the
/// properties' `sourceTime`s, which a patch may change.
fn editable_view(doc: &Map<String, Value>) -> Value {
    let mut view = doc.clone();
    view.remove("$dtId");
    view.remove("$etag");
    Value::Object(view)
}

fn patch_twin(
    graph: &mut Graph,
    id: &str,
    component: Option<&str>,
    patch: &Value,
    precondition: &Precondition,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> DomainResult<WriteOutcome> {
    let twin = graph
        .twin(id)
        .cloned()
        .ok_or_else(|| DomainError::TwinNotFound(id.to_owned()))?;
    precondition.check(Some(&twin.etag))?;
    let patch = parse_patch(patch)?;
    let mut view = editable_view(&twin.doc());
    {
        let target = match component {
            None => &mut view,
            Some(name) => {
                let old_model_iface = interface_for(graph, &twin.model)?;
                if !old_model_iface.interface.components.contains_key(name) {
                    return Err(DomainError::ComponentNotFound(name.to_owned()));
                }
                view.get_mut(name)
                    .ok_or_else(|| DomainError::ComponentNotFound(name.to_owned()))?
            }
        };
        json_patch::patch(target, &patch).map_err(|e| {
            DomainError::ValidationFailed(format!("the patch cannot be applied: {e}"))
        })?;
    }
    let Value::Object(mut body) = view else {
        return Err(DomainError::ValidationFailed(
            "the patch replaced the twin".into(),
        ));
    };
    let model = model_of(&body)?;
    let entry = interface_for(graph, &model)?;
    if entry.decommissioned && model != twin.model {
        return Err(DomainError::ModelDecommissioned(model.to_string()));
    }
    let iface = entry.interface.clone();
    let requested_meta = take_metadata(&mut body);
    check_all_source_times(&requested_meta, &body, &iface)?;
    check_twin_contents(&iface, &body, "")?;
    if model != twin.model {
        check_relationships_still_fit(graph, id, &iface)?;
    }
    let doc = assemble_twin(
        id,
        &ctx.new_etag(),
        &model,
        body,
        &requested_meta,
        Some(&twin),
        &iface,
        &ctx.now,
    );
    let twin = Arc::new(twin_from_parts(doc)?);
    graph.put_twin(twin.clone(), muts);
    Ok(WriteOutcome::Twin(twin))
}

fn relationship_definition<'a>(
    graph: &'a Graph,
    source: &Twin,
    name: &str,
) -> DomainResult<&'a dtdl::Relationship> {
    let entry = interface_for(graph, &source.model)?;
    entry.interface.relationships.get(name).ok_or_else(|| {
        DomainError::ValidationFailed(format!(
            "model {} defines no relationship named '{name}'",
            source.model
        ))
    })
}

fn put_relationship(
    graph: &mut Graph,
    source_id: String,
    id: String,
    mut body: Map<String, Value>,
    precondition: &Precondition,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> DomainResult<WriteOutcome> {
    check_id("relationship", &id)?;
    let source = graph
        .twin(&source_id)
        .cloned()
        .ok_or_else(|| DomainError::TwinNotFound(source_id.clone()))?;
    let existing = graph.relationship(&source_id, &id).cloned();
    precondition.check(existing.as_ref().map(|r| r.etag.as_str()))?;
    let target_id = body
        .get("$targetId")
        .and_then(Value::as_str)
        .ok_or_else(|| DomainError::ValidationFailed("$targetId is required".into()))?
        .to_owned();
    let name = body
        .get("$relationshipName")
        .and_then(Value::as_str)
        .ok_or_else(|| DomainError::ValidationFailed("$relationshipName is required".into()))?
        .to_owned();
    for (key, expected) in [("$sourceId", &source_id), ("$relationshipId", &id)] {
        if let Some(given) = body.get(key)
            && given.as_str() != Some(expected.as_str())
        {
            return Err(DomainError::ValidationFailed(format!(
                "{key} does not match the path"
            )));
        }
    }
    let target = graph
        .twin(&target_id)
        .cloned()
        .ok_or_else(|| DomainError::TargetTwinNotFound(target_id.clone()))?;
    let definition = relationship_definition(graph, &source, &name)?;
    if let Some(required) = &definition.target
        && !graph.is_of_model(&target, required, false)
    {
        return Err(DomainError::ValidationFailed(format!(
            "relationship '{name}' must target a twin of model {required}"
        )));
    }
    if existing.is_none() && graph.outgoing_count(&source_id) >= MAX_OUTGOING_RELATIONSHIPS {
        return Err(DomainError::ValidationFailed(format!(
            "twin '{source_id}' already has the maximum of {MAX_OUTGOING_RELATIONSHIPS} outgoing relationships"
        )));
    }
    if let Some(max) = definition.max_multiplicity {
        let count = graph
            .outgoing(&source_id)
            .filter(|r| r.name.as_ref() == name && r.id.as_ref() != id)
            .count();
        if count >= max as usize {
            return Err(DomainError::ValidationFailed(format!(
                "twin '{source_id}' already has the maximum of {max} '{name}' relationships"
            )));
        }
    }
    body.retain(|k, _| !k.starts_with('$'));
    check_relationship_properties(definition, &body)?;
    let mut doc = Map::new();
    doc.insert("$relationshipId".into(), Value::String(id));
    doc.insert("$etag".into(), Value::String(ctx.new_etag()));
    doc.insert("$sourceId".into(), Value::String(source_id));
    doc.insert("$relationshipName".into(), Value::String(name));
    doc.insert("$targetId".into(), Value::String(target_id));
    doc.extend(body);
    let rel = Arc::new(
        Relationship::from_doc(&doc, Some(&source.id), Some(&target.id))
            .ok_or_else(|| DomainError::ValidationFailed("malformed relationship".into()))?,
    );
    graph.put_relationship(rel.clone(), muts);
    Ok(WriteOutcome::Relationship(rel))
}

fn patch_relationship(
    graph: &mut Graph,
    source_id: &str,
    id: &str,
    patch: &Value,
    precondition: &Precondition,
    ctx: &WriteContext,
    muts: &mut Vec<Mutation>,
) -> DomainResult<WriteOutcome> {
    let rel = graph
        .relationship(source_id, id)
        .cloned()
        .ok_or_else(|| DomainError::RelationshipNotFound(id.to_owned()))?;
    precondition.check(Some(&rel.etag))?;
    let patch = parse_patch(patch)?;
    for op in &patch.0 {
        if op.path().as_str().starts_with("/$") {
            return Err(DomainError::InvalidArgument(
                "only relationship properties can be patched".into(),
            ));
        }
    }
    let mut view = Value::Object(rel.doc());
    json_patch::patch(&mut view, &patch)
        .map_err(|e| DomainError::ValidationFailed(format!("the patch cannot be applied: {e}")))?;
    let Value::Object(mut doc) = view else {
        return Err(DomainError::ValidationFailed(
            "the patch replaced the relationship".into(),
        ));
    };
    let source = graph
        .twin(source_id)
        .cloned()
        .ok_or_else(|| DomainError::TwinNotFound(source_id.to_owned()))?;
    let definition = relationship_definition(graph, &source, &rel.name)?;
    check_relationship_properties(definition, &doc)?;
    doc.insert("$etag".into(), Value::String(ctx.new_etag()));
    let rel = Arc::new(
        Relationship::from_doc(&doc, Some(&rel.source), Some(&rel.target))
            .ok_or_else(|| DomainError::ValidationFailed("malformed relationship".into()))?,
    );
    graph.put_relationship(rel.clone(), muts);
    Ok(WriteOutcome::Relationship(rel))
}

/// What an operation found before it ran, to describe its change afterwards.
enum Before {
    Nothing,
    Twin(Option<Arc<Twin>>),
    TwinPatch {
        component: Option<String>,
        patch: Value,
    },
    Relationship(Option<Arc<Relationship>>),
    RelationshipPatch(Value),
}

impl Before {
    fn of(op: &WriteOp, graph: &Graph) -> Self {
        match op {
            WriteOp::PutTwin { id, .. } | WriteOp::DeleteTwin { id, .. } => {
                Self::Twin(graph.twin(id).cloned())
            }
            WriteOp::PatchTwin {
                component, patch, ..
            } => Self::TwinPatch {
                component: component.clone(),
                patch: patch.clone(),
            },
            WriteOp::PutRelationship { source, id, .. }
            | WriteOp::DeleteRelationship { source, id, .. } => {
                Self::Relationship(graph.relationship(source, id).cloned())
            }
            WriteOp::PatchRelationship { patch, .. } => Self::RelationshipPatch(patch.clone()),
            _ => Self::Nothing,
        }
    }

    /// The change an operation made, from what it found and what it returned.
    fn change(self, graph: &Graph, outcome: &WriteOutcome) -> Option<Change> {
        match (self, outcome) {
            (Self::Twin(None), WriteOutcome::Twin(twin)) => {
                Some(twin_change(feed::TWIN_CREATE, twin, twin_json(twin)))
            }
            (Self::Twin(Some(old)), WriteOutcome::Twin(twin)) => {
                let patch = json_patch::diff(&patch_view(&old), &patch_view(twin));
                Some(twin_change(
                    feed::TWIN_UPDATE,
                    twin,
                    update_data(&twin.model, serde_json::to_value(patch).ok()?),
                ))
            }
            (Self::Twin(Some(old)), WriteOutcome::Done) => {
                Some(twin_change(feed::TWIN_DELETE, &old, twin_json(&old)))
            }
            (Self::TwinPatch { component, patch }, WriteOutcome::Twin(twin)) => {
                let patch = match component {
                    Some(name) => prefix_paths(patch, &name),
                    None => patch,
                };
                Some(twin_change(
                    feed::TWIN_UPDATE,
                    twin,
                    update_data(&twin.model, patch),
                ))
            }
            (Self::Relationship(None), WriteOutcome::Relationship(rel)) => Some(
                relationship_change(feed::RELATIONSHIP_CREATE, rel, rel_json(rel)),
            ),
            (Self::Relationship(Some(old)), WriteOutcome::Relationship(rel)) => {
                let patch = json_patch::diff(&Value::Object(old.doc()), &Value::Object(rel.doc()));
                let patch = strip_system_paths(serde_json::to_value(patch).ok()?);
                let model = source_model(graph, rel);
                Some(relationship_change(
                    feed::RELATIONSHIP_UPDATE,
                    rel,
                    update_data(&model, patch),
                ))
            }
            (Self::Relationship(Some(old)), WriteOutcome::Done) => Some(relationship_change(
                feed::RELATIONSHIP_DELETE,
                &old,
                rel_json(&old),
            )),
            (Self::RelationshipPatch(patch), WriteOutcome::Relationship(rel)) => {
                let model = source_model(graph, rel);
                Some(relationship_change(
                    feed::RELATIONSHIP_UPDATE,
                    rel,
                    update_data(&model, patch),
                ))
            }
            _ => None,
        }
    }
}

fn twin_json(twin: &Twin) -> Value {
    serde_json::from_str(twin.json().get()).unwrap_or(Value::Null)
}

fn rel_json(rel: &Relationship) -> Value {
    serde_json::from_str(rel.json().get()).unwrap_or(Value::Null)
}

fn twin_change(event_type: &'static str, twin: &Twin, data: Value) -> Change {
    Change {
        event_type,
        twin: twin.id.to_string(),
        subject: twin.id.to_string(),
        data,
        dataschema: Some(twin.model.to_string()),
        component: None,
        source_time: None,
    }
}

fn relationship_change(event_type: &'static str, rel: &Relationship, data: Value) -> Change {
    Change {
        event_type,
        twin: rel.source.to_string(),
        subject: format!("{}/relationships/{}", rel.source, rel.id),
        data,
        dataschema: None,
        component: None,
        source_time: None,
    }
}

fn update_data(model: &impl std::fmt::Display, patch: Value) -> Value {
    serde_json::json!({"modelId": model.to_string(), "patch": patch})
}

fn source_model(graph: &Graph, rel: &Relationship) -> String {
    graph
        .twin(&rel.source)
        .map(|t| t.model.to_string())
        .unwrap_or_default()
}

/// A twin's document as a replacement is compared: without `$dtId`, `$etag` and the
/// `$metadata` times that every write changes.
fn patch_view(twin: &Twin) -> Value {
    let mut doc = twin.doc();
    doc.remove("$dtId");
    doc.remove("$etag");
    if let Some(Value::Object(meta)) = doc.get_mut("$metadata") {
        meta.remove("$lastUpdateTime");
        for value in meta.values_mut() {
            if let Value::Object(prop) = value {
                prop.remove("lastUpdateTime");
            }
        }
    }
    Value::Object(doc)
}

/// Drops the operations on `$`-prefixed fields (etag and identity) from a relationship diff.
fn strip_system_paths(patch: Value) -> Value {
    match patch {
        Value::Array(ops) => Value::Array(
            ops.into_iter()
                .filter(|op| {
                    op.get("path")
                        .and_then(Value::as_str)
                        .is_some_and(|p| !p.starts_with("/$"))
                })
                .collect(),
        ),
        other => other,
    }
}

/// A component patch's operations with paths from the twin's root, as ADT reports them.
fn prefix_paths(patch: Value, component: &str) -> Value {
    let escaped = component.replace('~', "~0").replace('/', "~1");
    match patch {
        Value::Array(ops) => Value::Array(
            ops.into_iter()
                .map(|mut op| {
                    if let Some(Value::String(path)) = op.get_mut("path") {
                        *path = format!("/{escaped}{path}");
                    }
                    op
                })
                .collect(),
        ),
        other => other,
    }
}

/// Most bytes of one telemetry message body (ADT's limit is 32 KiB).
pub const MAX_TELEMETRY_BYTES: usize = 32 * 1024;

fn publish_telemetry(
    graph: &Graph,
    message: TelemetryMessage,
    ctx: &WriteContext,
) -> DomainResult<WriteOutcome> {
    let twin = graph
        .twin(&message.twin)
        .ok_or_else(|| DomainError::TwinNotFound(message.twin.clone()))?;
    if message.message_id.is_empty() || message.message_id.len() > 128 {
        return Err(DomainError::InvalidArgument(
            "Message-Id must be 1 to 128 characters".into(),
        ));
    }
    if !message.body.is_object() {
        return Err(DomainError::InvalidArgument(
            "the telemetry body must be a JSON object".into(),
        ));
    }
    let schema = match &message.component {
        None => twin.model.to_string(),
        Some(name) => {
            let entry = interface_for(graph, &twin.model)?;
            let component = entry
                .interface
                .components
                .get(name.as_str())
                .ok_or_else(|| DomainError::ComponentNotFound(name.clone()))?;
            component.schema.id.to_string()
        }
    };
    if ctx
        .feed
        .borrow_mut()
        .seen_message(&message.twin, &message.message_id, ctx.unix_now)
    {
        return Ok(WriteOutcome::Done);
    }
    let subject = match &message.component {
        None => message.twin.clone(),
        Some(name) => format!("{}/components/{name}", message.twin),
    };
    ctx.changes.borrow_mut().push(Change {
        event_type: feed::TELEMETRY,
        twin: message.twin,
        subject,
        data: message.body,
        dataschema: Some(schema),
        component: message.component,
        source_time: message.source_time,
    });
    Ok(WriteOutcome::Done)
}
