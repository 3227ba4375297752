//! Each node's audit log, kept in the database beside the node's own file (`docs/audit.md`,
//! "Several nodes"): the node's verifier key (`twinguard_audit_nodes`), its entries as
//! recorded (`twinguard_audit`, keyed by node and index) and its signed checkpoints
//! (`twinguard_audit_checkpoints`). These tables are outside the records and the commit
//! counter: a node's audit groups never fence another node's writes. Each node writes only its
//! own rows; the offline verifier reads them all.

use twinguard_core::store::StoreError;

use crate::{PgStore, pg_err, pool_err};

/// A node whose audit log the database keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditNode {
    /// The node's name for its log (derived from its key by the server).
    pub node: String,
    /// The verifier key of the node's checkpoints, in the signed-note format.
    pub verifier_key: String,
}

/// Most entries one read of a log returns.
pub const AUDIT_PAGE: usize = 10_000;

fn index(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError("an audit index is out of range".into()))
}

impl PgStore {
    /// Records `node`'s verifier key, once: a node name already registered with another key is
    /// refused (two nodes must never write one log).
    pub fn audit_register(&self, node: &str, verifier_key: &str) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        let (node, key) = (node.to_owned(), verifier_key.to_owned());
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            client
                .execute(
                    "INSERT INTO twinguard_audit_nodes (node, verifier_key) VALUES ($1, $2) \
                     ON CONFLICT (node) DO NOTHING",
                    &[&node, &key],
                )
                .await
                .map_err(|e| pg_err("registering the audit log", &e))?;
            let row = client
                .query_one(
                    "SELECT verifier_key FROM twinguard_audit_nodes WHERE node = $1",
                    &[&node],
                )
                .await
                .map_err(|e| pg_err("registering the audit log", &e))?;
            let stored: String = row.try_get(0).map_err(|e| pg_err("audit", &e))?;
            if stored != key {
                return Err(StoreError(format!(
                    "the audit log {node} is registered with another key"
                )));
            }
            Ok(())
        })
    }

    /// How many entries of `node`'s log the database holds (entries `0..n`).
    pub fn audit_size(&self, node: &str) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        let node = node.to_owned();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            let row = client
                .query_one(
                    "SELECT coalesce(max(seq) + 1, 0) FROM twinguard_audit WHERE node = $1",
                    &[&node],
                )
                .await
                .map_err(|e| pg_err("reading the audit log's size", &e))?;
            let size: i64 = row.try_get(0).map_err(|e| pg_err("audit", &e))?;
            Ok(u64::try_from(size).unwrap_or(0))
        })
    }

    /// Starts storing `lines` as entries `first..` of `node`'s log, in one statement; the
    /// function returned waits until they are durable. An entry already stored is kept if it
    /// is the same and refused if it differs.
    pub fn audit_append(
        &self,
        node: &str,
        first: u64,
        lines: Vec<Vec<u8>>,
    ) -> impl FnOnce() -> Result<(), StoreError> + Send + 'static {
        let pool = self.pool.clone();
        let node = node.to_owned();
        self.start(async move {
            let start = index(first)?;
            let count = i64::try_from(lines.len())
                .map_err(|_| StoreError("too many audit entries at once".into()))?;
            let seqs: Vec<i64> = (start..start + count).collect();
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            // Rows inserted plus rows that held the same entry already: all of them, or an
            // entry differs from the one stored under its index.
            let stored = client
                .execute(
                    "INSERT INTO twinguard_audit (node, seq, entry) \
                     SELECT $1, * FROM unnest($2::bigint[], $3::bytea[]) \
                     ON CONFLICT (node, seq) DO UPDATE SET entry = EXCLUDED.entry \
                     WHERE twinguard_audit.entry = EXCLUDED.entry",
                    &[&node, &seqs, &lines],
                )
                .await
                .map_err(|e| pg_err("storing audit entries", &e))?;
            if stored != lines.len() as u64 {
                return Err(StoreError(format!(
                    "the database holds other entries under indexes {first} to {} of the audit log {node}",
                    first + lines.len() as u64 - 1
                )));
            }
            Ok(())
        })
    }

    /// Stores a signed checkpoint of the first `size` entries of `node`'s log.
    pub fn audit_checkpoint(&self, node: &str, size: u64, note: &str) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        let (node, note) = (node.to_owned(), note.to_owned());
        self.run(async move {
            let size = index(size)?;
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            client
                .execute(
                    "INSERT INTO twinguard_audit_checkpoints (node, size, note) \
                     VALUES ($1, $2, $3) ON CONFLICT (node, size) DO NOTHING",
                    &[&node, &size, &note],
                )
                .await
                .map_err(|e| pg_err("storing an audit checkpoint", &e))?;
            Ok(())
        })
    }

    /// Every node whose log the database keeps, by name.
    pub fn audit_nodes(&self) -> Result<Vec<AuditNode>, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            let rows = client
                .query(
                    "SELECT node, verifier_key FROM twinguard_audit_nodes ORDER BY node",
                    &[],
                )
                .await
                .map_err(|e| pg_err("reading the audit logs", &e))?;
            rows.iter()
                .map(|row| {
                    Ok(AuditNode {
                        node: row.try_get(0).map_err(|e| pg_err("audit", &e))?,
                        verifier_key: row.try_get(1).map_err(|e| pg_err("audit", &e))?,
                    })
                })
                .collect()
        })
    }

    /// Entries of `node`'s log from index `from` on, in order, at most [`AUDIT_PAGE`]: each
    /// with the index it is stored under.
    pub fn audit_entries(&self, node: &str, from: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let pool = self.pool.clone();
        let node = node.to_owned();
        self.run(async move {
            let from = index(from)?;
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            let rows = client
                .query(
                    "SELECT seq, entry FROM twinguard_audit WHERE node = $1 AND seq >= $2 \
                     ORDER BY seq LIMIT $3",
                    &[&node, &from, &(AUDIT_PAGE as i64)],
                )
                .await
                .map_err(|e| pg_err("reading audit entries", &e))?;
            rows.iter()
                .map(|row| {
                    let seq: i64 = row.try_get(0).map_err(|e| pg_err("audit", &e))?;
                    let entry: Vec<u8> = row.try_get(1).map_err(|e| pg_err("audit", &e))?;
                    Ok((u64::try_from(seq).unwrap_or(0), entry))
                })
                .collect()
        })
    }

    /// The signed checkpoints of `node`'s log covering `from` entries or more, by size, at
    /// most [`AUDIT_PAGE`].
    pub fn audit_checkpoints(
        &self,
        node: &str,
        from: u64,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let pool = self.pool.clone();
        let node = node.to_owned();
        self.run(async move {
            let from = index(from)?;
            let client = pool.get().await.map_err(|e| pool_err("audit", e))?;
            let rows = client
                .query(
                    "SELECT size, note FROM twinguard_audit_checkpoints WHERE node = $1 \
                     AND size >= $2 ORDER BY size LIMIT $3",
                    &[&node, &from, &(AUDIT_PAGE as i64)],
                )
                .await
                .map_err(|e| pg_err("reading audit checkpoints", &e))?;
            rows.iter()
                .map(|row| {
                    let size: i64 = row.try_get(0).map_err(|e| pg_err("audit", &e))?;
                    let note: String = row.try_get(1).map_err(|e| pg_err("audit", &e))?;
                    Ok((u64::try_from(size).unwrap_or(0), note))
                })
                .collect()
        })
    }
}
