//! Running a deletion: every relationship, then every twin, then every model.

use std::collections::BTreeSet;

use serde_json::json;
use twinguard_core::auth::Principal;
use twinguard_core::dtmi::Dtmi;
use twinguard_core::error::DomainError;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::service::TwinService;
use twinguard_proto::ErrorCode;

use super::{Handle, JobError, Outcome, Pipeline, rejected};

/// Items a deletion pass takes from one snapshot.
const DELETION_CHUNK: usize = 1000;

/// Deletes every relationship, then every twin, then every model, a chunk at a time.
pub(super) async fn run_deletion(
    service: &TwinService,
    principal: &Principal,
    handle: &Handle,
) -> Outcome {
    let mut pipeline = Pipeline::new(service, principal);
    // Relationships.
    loop {
        if handle.cancelled() {
            return Outcome::Cancelled;
        }
        let chunk: Vec<(String, String)> = service
            .snapshot()
            .relationships()
            .take(DELETION_CHUNK)
            .map(|r| (r.source.to_string(), r.id.to_string()))
            .collect();
        if chunk.is_empty() {
            break;
        }
        for (source, id) in chunk {
            let op = WriteOp::DeleteRelationship {
                source,
                id,
                precondition: Precondition::None,
            };
            if let Err(e) = pipeline.submit(0, op).await {
                return Outcome::Failed(e);
            }
        }
        let (done, error) = pipeline.drain().await;
        handle.progress(|p| p.relationships += done);
        if let Some(e) = error {
            return Outcome::Failed(e);
        }
    }
    // Twins.
    loop {
        if handle.cancelled() {
            return Outcome::Cancelled;
        }
        let chunk: Vec<String> = service
            .snapshot()
            .twins()
            .take(DELETION_CHUNK)
            .map(|t| t.id.to_string())
            .collect();
        if chunk.is_empty() {
            break;
        }
        for id in chunk {
            let op = WriteOp::DeleteTwin {
                id,
                precondition: Precondition::None,
            };
            if let Err(e) = pipeline.submit(0, op).await {
                return Outcome::Failed(e);
            }
        }
        let (done, error) = pipeline.drain().await;
        handle.progress(|p| p.twins += done);
        if let Some(e) = error {
            return Outcome::Failed(e);
        }
    }
    // Models: a model another one extends (or uses as a component) goes in a later pass.
    loop {
        if handle.cancelled() {
            return Outcome::Cancelled;
        }
        let ids: BTreeSet<Dtmi> = service.snapshot().models().map(|m| m.id.clone()).collect();
        if ids.is_empty() {
            break;
        }
        let mut deleted = 0u64;
        let mut last_error = None;
        for id in ids {
            match service.write(principal, WriteOp::DeleteModel(id)).await {
                Ok(_) => deleted += 1,
                Err(DomainError::ModelReferenced(..)) => {}
                Err(e) => last_error = Some(e),
            }
        }
        handle.progress(|p| p.models += deleted);
        if deleted == 0 {
            return Outcome::Failed(match last_error {
                Some(e) => rejected(None, e),
                None => JobError {
                    code: ErrorCode::ModelReferencesNotDeleted.as_str().to_owned(),
                    message: "models remain that reference each other".into(),
                },
            });
        }
    }
    handle.log(
        "Info",
        json!({"message": "every model, twin and relationship was deleted"}),
    );
    Outcome::Succeeded
}
