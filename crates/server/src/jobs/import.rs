//! Running an import: the file's sections, read line by line, applied in order.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use twinguard_core::auth::Principal;
use twinguard_core::error::DomainError;
use twinguard_core::graph::{Precondition, WriteOp};
use twinguard_core::service::TwinService;
use twinguard_proto::ErrorCode;

use super::{
    BUSY_RETRIES, Handle, JobError, MAX_LINE_BYTES, MAX_MODELS_SECTION_BYTES, MODEL_BATCH, Outcome,
    Pipeline, malformed, private_file, rejected,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Start,
    Header,
    Models,
    Twins,
    Relationships,
}

/// Reads one line of at most [`MAX_LINE_BYTES`] into `buf` (without its line break); `None` at
/// the end of the input.
async fn read_line(
    reader: &mut tokio::io::BufReader<tokio::fs::File>,
    buf: &mut Vec<u8>,
    number: u64,
) -> Result<Option<()>, JobError> {
    buf.clear();
    let limit = MAX_LINE_BYTES as u64 + 2;
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', buf)
        .await
        .map_err(|e| JobError {
            code: ErrorCode::InternalServerError.as_str().to_owned(),
            message: format!("the input could not be read at line {number}: {e}"),
        })?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.len() > MAX_LINE_BYTES {
        return Err(malformed(
            number,
            format!("the line is longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    Ok(Some(()))
}

/// Models read so far, with the line each came from.
#[derive(Default)]
struct ModelSection {
    models: Vec<(u64, Value)>,
    bytes: usize,
}

/// The DTMIs a model needs before it: what it extends and its components' schemas.
fn model_dependencies(model: &Value) -> Vec<String> {
    let mut out: Vec<String> = match model.get("extends") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    };
    if let Some(Value::Array(contents)) = model.get("contents") {
        for c in contents {
            let is_component = match c.get("@type") {
                Some(Value::String(t)) => t == "Component",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "Component"),
                _ => false,
            };
            if is_component && let Some(Value::String(s)) = c.get("schema") {
                out.push(s.clone());
            }
        }
    }
    out
}

/// The models in an order where each comes after the models of the section it depends on
/// (file order otherwise; a cycle is left for the DTDL compiler to report).
fn dependency_order(models: Vec<(u64, Value)>) -> Vec<(u64, Value)> {
    let index: HashMap<String, usize> = models
        .iter()
        .enumerate()
        .filter_map(|(i, (_, m))| {
            m.get("@id")
                .and_then(Value::as_str)
                .map(|id| (id.to_owned(), i))
        })
        .collect();
    let deps: Vec<Vec<usize>> = models
        .iter()
        .map(|(_, m)| {
            model_dependencies(m)
                .iter()
                .filter_map(|d| index.get(d).copied())
                .collect()
        })
        .collect();
    let mut order = Vec::with_capacity(models.len());
    let mut state = vec![0u8; models.len()]; // 0 new, 1 on the stack, 2 placed
    for root in 0..models.len() {
        if state[root] != 0 {
            continue;
        }
        // Iterative depth-first search: (node, next dependency to look at).
        let mut stack = vec![(root, 0usize)];
        state[root] = 1;
        while let Some((node, next)) = stack.last_mut() {
            let node = *node;
            if let Some(&dep) = deps[node].get(*next) {
                *next += 1;
                if state[dep] == 0 {
                    state[dep] = 1;
                    stack.push((dep, 0));
                }
            } else {
                state[node] = 2;
                order.push(node);
                stack.pop();
            }
        }
    }
    let mut slots: Vec<Option<(u64, Value)>> = models.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
        .collect()
}

/// Uploads the models section in dependency order, [`MODEL_BATCH`] models at a time.
async fn upload_models(
    service: &TwinService,
    principal: &Principal,
    handle: &Handle,
    section: ModelSection,
) -> Result<(), Outcome> {
    let ordered = dependency_order(section.models);
    let mut batch: Vec<Value> = Vec::with_capacity(MODEL_BATCH);
    let mut lines: Vec<u64> = Vec::with_capacity(MODEL_BATCH);
    let mut iter = ordered.into_iter().peekable();
    while iter.peek().is_some() {
        batch.clear();
        lines.clear();
        for (line, model) in iter.by_ref().take(MODEL_BATCH) {
            lines.push(line);
            batch.push(model);
        }
        if handle.cancelled() {
            return Err(Outcome::Cancelled);
        }
        let mut tries = 0;
        let result = loop {
            match service.submit(principal, WriteOp::UploadModels(batch.clone())) {
                Ok(pending) => break pending.await,
                // Uploads compile two at a time; an API upload may hold the slots a while.
                Err(DomainError::Unavailable) if tries < 30 * BUSY_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(_) => {
                let n = batch.len() as u64;
                handle.progress(|p| p.models += n);
            }
            Err(e) => {
                let first = lines.iter().min().copied().unwrap_or(0);
                let mut err = rejected(None, e);
                err.message = format!(
                    "a batch of {} models (the first from line {first}) was rejected: {}",
                    lines.len(),
                    err.message
                );
                return Err(Outcome::Failed(err));
            }
        }
    }
    Ok(())
}

/// Fetches `url` into `path`, at most `limit` bytes; the error says what went wrong in words the
/// caller may see (the detail goes to the log).
pub(super) async fn download(
    client: &reqwest::Client,
    url: reqwest::Url,
    spooled: &mut super::Spooled,
    limit: u64,
) -> Result<u64, JobError> {
    let failed = |message: String| JobError {
        code: ErrorCode::BadRequest.as_str().to_owned(),
        message,
    };
    let mut response = client.get(url).send().await.map_err(|e| {
        tracing::info!(error = %e, "an import job's input could not be fetched");
        failed(
            "the input could not be fetched (unreachable, or refused by the egress allowlist)"
                .into(),
        )
    })?;
    if !response.status().is_success() {
        return Err(failed(format!(
            "fetching the input answered HTTP {}",
            response.status().as_u16()
        )));
    }
    let mut file = private_file(&spooled.path).await.map_err(|e| {
        tracing::error!(error = %e, "cannot create an import job's spool file");
        failed("the input could not be stored".into())
    })?;
    let mut written: u64 = 0;
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            tracing::info!(error = %e, "an import job's input broke off");
            failed("fetching the input broke off".into())
        })?;
        let Some(chunk) = chunk else { break };
        written = written.saturating_add(chunk.len() as u64);
        if written > limit {
            return Err(failed(format!("the input is larger than {limit} bytes")));
        }
        spooled.grow(chunk.len() as u64).map_err(|full| JobError {
            code: ErrorCode::ServiceUnavailable.as_str().to_owned(),
            message: match full {
                super::SpoolFull::Budget(limit) => format!(
                    "import inputs waiting or running hold the spool's {limit} bytes; retry when they finish"
                ),
                super::SpoolFull::Disk => {
                    "the server has too little free disk space to take the input".to_owned()
                }
            },
        })?;
        file.write_all(&chunk).await.map_err(|e| {
            tracing::error!(error = %e, "cannot write an import job's spool file");
            failed("the input could not be stored".into())
        })?;
    }
    file.flush()
        .await
        .map_err(|_| failed("the input could not be stored".into()))?;
    Ok(written)
}

/// Applies an import file; see `docs/jobs.md` for what is applied when it fails.
pub(super) async fn run_import(
    service: &TwinService,
    principal: &Principal,
    handle: &Handle,
    path: &Path,
) -> Outcome {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            return Outcome::Failed(JobError {
                code: ErrorCode::InternalServerError.as_str().to_owned(),
                message: format!("the input could not be opened: {e}"),
            });
        }
    };
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
    let mut buf = Vec::new();
    let mut number: u64 = 0;
    let mut section = Section::Start;
    let mut models = ModelSection::default();
    let mut pipeline = Pipeline::new(service, principal);
    // The first failure; what is in flight is still awaited before the job ends.
    let mut failure: Option<Outcome> = None;
    loop {
        number += 1;
        if handle.cancelled() {
            failure = Some(Outcome::Cancelled);
            break;
        }
        match read_line(&mut reader, &mut buf, number).await {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err(e) => {
                failure = Some(Outcome::Failed(e));
                break;
            }
        }
        if number.is_multiple_of(4096) {
            handle.progress(|p| p.lines = number);
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => {
                failure = Some(Outcome::Failed(malformed(
                    number,
                    format!("not valid JSON ({e})"),
                )));
                break;
            }
        };
        let Value::Object(mut object) = value else {
            failure = Some(Outcome::Failed(malformed(number, "not a JSON object")));
            break;
        };
        // A section line holds `Section` alone (a twin may have a property of that name).
        if object.len() == 1
            && let Some(name) = object.get("Section")
        {
            let next = match name.as_str() {
                Some("Header") => Section::Header,
                Some("Models") => Section::Models,
                Some("Twins") => Section::Twins,
                Some("Relationships") => Section::Relationships,
                _ => {
                    failure = Some(Outcome::Failed(malformed(
                        number,
                        "the section is none of Header, Models, Twins and Relationships",
                    )));
                    break;
                }
            };
            if next <= section || (section == Section::Start && next != Section::Header) {
                failure = Some(Outcome::Failed(malformed(
                    number,
                    "sections come once each, Header first, in the order Header, Models, Twins, Relationships",
                )));
                break;
            }
            if section == Section::Models {
                let done = std::mem::take(&mut models);
                if let Err(outcome) = upload_models(service, principal, handle, done).await {
                    failure = Some(outcome);
                    break;
                }
            }
            if section == Section::Twins {
                // Relationships need their twins: every twin write is done first.
                let (done, error) = pipeline.drain().await;
                handle.progress(|p| p.twins += done);
                if let Some(e) = error {
                    failure = Some(Outcome::Failed(e));
                    break;
                }
            }
            handle.log("Info", json!({"section": name, "line": number}));
            section = next;
            continue;
        }
        let limit = match section {
            Section::Twins | Section::Relationships => crate::app::TWIN_BODY_LIMIT,
            _ => crate::app::MODEL_UPLOAD_LIMIT,
        };
        if buf.len() > limit {
            failure = Some(Outcome::Failed(malformed(
                number,
                format!("the line is longer than {limit} bytes, the API's limit for it"),
            )));
            break;
        }
        let step = match section {
            Section::Start => Err(malformed(
                number,
                "the file must start with the Header section",
            )),
            Section::Header => Ok(0),
            Section::Models => {
                models.bytes += buf.len();
                if models.bytes > MAX_MODELS_SECTION_BYTES
                    || models.models.len() >= twinguard_core::graph::ops::MAX_MODELS
                {
                    Err(malformed(
                        number,
                        format!(
                            "the models section holds at most {} models and {MAX_MODELS_SECTION_BYTES} bytes",
                            twinguard_core::graph::ops::MAX_MODELS
                        ),
                    ))
                } else {
                    models.models.push((number, Value::Object(object)));
                    Ok(0)
                }
            }
            Section::Twins => match object.get("$dtId").and_then(Value::as_str) {
                Some(id) => {
                    let id = id.to_owned();
                    pipeline
                        .submit(
                            number,
                            WriteOp::PutTwin {
                                id,
                                body: object,
                                precondition: Precondition::None,
                            },
                        )
                        .await
                        .inspect(|&done| {
                            if done > 0 {
                                handle.progress(|p| p.twins += done);
                            }
                        })
                }
                None => Err(malformed(number, "a twin needs a string $dtId")),
            },
            Section::Relationships => {
                let source = object.remove("$dtId");
                match (
                    source,
                    object.get("$relationshipId").and_then(Value::as_str),
                ) {
                    (Some(Value::String(source)), Some(id)) => {
                        let id = id.to_owned();
                        pipeline
                            .submit(
                                number,
                                WriteOp::PutRelationship {
                                    source,
                                    id,
                                    body: object,
                                    precondition: Precondition::None,
                                },
                            )
                            .await
                            .inspect(|&done| {
                                if done > 0 {
                                    handle.progress(|p| p.relationships += done);
                                }
                            })
                    }
                    _ => Err(malformed(
                        number,
                        "a relationship needs a string $dtId (its source) and $relationshipId",
                    )),
                }
            }
        };
        if let Err(e) = step {
            failure = Some(Outcome::Failed(e));
            break;
        }
    }
    // Everything read before the failure point is applied (or rejected on its own), nothing
    // after it: the models read so far are uploaded, the writes in flight are awaited.
    if section == Section::Models && !matches!(failure, Some(Outcome::Cancelled)) {
        let done = std::mem::take(&mut models);
        if !done.models.is_empty()
            && let Err(outcome) = upload_models(service, principal, handle, done).await
            && failure.is_none()
        {
            failure = Some(outcome);
        }
    }
    let (done, error) = pipeline.drain().await;
    handle.progress(|p| {
        p.lines = number.saturating_sub(1);
        match section {
            Section::Relationships => p.relationships += done,
            _ => p.twins += done,
        }
    });
    if let Some(outcome) = failure {
        if let Outcome::Failed(e) = &outcome {
            handle.log("Error", json!({"code": e.code, "message": e.message}));
        }
        return outcome;
    }
    if let Some(e) = error {
        handle.log("Error", json!({"code": e.code, "message": e.message}));
        return Outcome::Failed(e);
    }
    if section == Section::Start {
        return Outcome::Failed(malformed(
            1,
            "the file is empty; it must start with the Header section",
        ));
    }
    Outcome::Succeeded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_ordered_after_what_they_extend_and_use() {
        let models = vec![
            (1, json!({"@id": "dtmi:a:C;1", "extends": "dtmi:a:B;1"})),
            (2, json!({"@id": "dtmi:a:B;1", "extends": ["dtmi:a:A;1"]})),
            (
                3,
                json!({"@id": "dtmi:a:A;1", "contents": [{"@type": "Component", "name": "c", "schema": "dtmi:a:D;1"}]}),
            ),
            (4, json!({"@id": "dtmi:a:D;1"})),
        ];
        let lines: Vec<u64> = dependency_order(models)
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(lines, vec![4, 3, 2, 1]);
    }

    #[test]
    fn a_dependency_cycle_does_not_loop_and_keeps_every_model() {
        let models = vec![
            (1, json!({"@id": "dtmi:a:A;1", "extends": "dtmi:a:B;1"})),
            (2, json!({"@id": "dtmi:a:B;1", "extends": "dtmi:a:A;1"})),
        ];
        assert_eq!(dependency_order(models).len(), 2);
    }

    #[test]
    fn dependencies_are_read_from_extends_and_components() {
        let m = json!({"extends": ["dtmi:x:A;1"], "contents": [
            {"@type": ["Component"], "name": "c", "schema": "dtmi:x:B;1"},
            {"@type": "Property", "name": "p", "schema": "string"}]});
        assert_eq!(model_dependencies(&m), vec!["dtmi:x:A;1", "dtmi:x:B;1"]);
    }
}
